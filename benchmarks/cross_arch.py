"""Cross-architecture evaluation of exported sets: fresh ConvNet, AlexNet, VGG-11 and ResNet-18 on each set.

    python benchmarks/cross_arch.py runs/bench/frepo_mnist_ipc10_cpu_lr3e-3/distilled.pt \\
        runs/random/mnist_ipc10/distilled.pt --name cross_arch_mnist_ipc10 --epochs 100 --repeats 1

Trains ``--repeats`` fresh networks of every ``--arch`` on every set under one protocol (``dc`` by default), the
same training that the ``CrossArchitectureEval`` callback and ``lightning-distill evaluate`` run, and writes
``OUT/NAME.{json,md,png}`` stamped with date, hardware, torch version and commit: one row per (set, architecture),
a table with the architectures as columns, and a grouped bar chart. Every finished (set, architecture) is saved at
once, and a re-run with the same options skips what is saved, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import keep_previous, save_figure, stamp, write_result  # noqa: E402

from lightning_distill.data import check_datamodule_record  # noqa: E402
from lightning_distill.eval import evaluate_distilled, get_protocol  # noqa: E402
from lightning_distill.eval.distilled import check_device, check_length  # noqa: E402
from lightning_distill.export import ExportError, load_distilled, set_digest  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.nets import list_nets  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402

ARCHS = ["convnet", "alexnet", "vgg11", "resnet18"]


def set_label(row: dict[str, Any]) -> str:
    e = row["extra"]
    return f"{e['method']} ({Path(e['path']).parent.name})"


def grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """Architectures and sets in first-seen order, and each (set, architecture)'s row: the table's and plot's layout."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    sets = list(dict.fromkeys(set_label(r) for r in rows))
    return archs, sets, {(set_label(r), r["arch"]): r for r in rows}


def markdown(res: dict[str, Any]) -> str:
    s, rows = res["stamp"], res["rows"]
    archs, sets, cell = grid(rows)
    proto = get_protocol(res["protocol"])
    first = rows[0] if rows else None
    steps = f"{first['steps']} steps per network" if first else ""
    lines = [
        f"## Cross-architecture accuracy ({res['protocol']} protocol)",
        "",
        f"{s['date']}, {s['hardware']}, torch {s['torch']}, commit {s['commit']}. Each cell: mean ± std over "
        f"{res['repeats']} fresh network(s), test accuracy in %; {steps}"
        + (f" ({res['epochs']} epochs; the protocol's: {proto.epochs})" if res["epochs"] else "")
        + ".",
        "",
        "| set | " + " | ".join(archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for name in sets:
        vals = []
        for a in archs:
            r = cell.get((name, a))
            vals.append(f"{r['mean']:.1f} ± {r['std']:.1f}" if r else "–")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs, sets, cell = grid(res["rows"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.7 * len(archs), 4))
    width = 0.8 / max(len(sets), 1)
    for i, name in enumerate(sets):
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(archs))]
        got = [cell.get((name, a)) for a in archs]
        ax.bar(
            xs,
            [r["mean"] if r else 0 for r in got],
            width,
            yerr=[r["std"] if r else 0 for r in got],
            label=name,
        )
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("test accuracy (%)")
    epochs = f", {res['epochs']} epochs" if res["epochs"] else ""
    ax.set_title(f"cross-architecture, {res['protocol']} protocol{epochs}")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path, res["stamp"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", help="distilled.pt files (ExportDistilled)")
    p.add_argument("--arch", nargs="+", default=ARCHS, help=f"networks (default: {' '.join(ARCHS)})")
    p.add_argument("--protocol", default="dc")
    p.add_argument("--repeats", type=int, default=5, help="networks per (set, architecture)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (CPU budgets)")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's steps (smoke tests)")
    p.add_argument("--root", default=None, help="data root holding the test split (default: as recorded)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default="cross_arch", help="output stem: OUT/NAME.{json,md,png}")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    unknown = [x for x in a.arch if x not in list_nets()]
    if unknown:
        p.error(f"unknown architecture {', '.join(unknown)}; choose from {', '.join(list_nets())}")
    missing = [x for x in a.sets if not Path(x).is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)} (export a set with the ExportDistilled callback first)")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    try:
        get_protocol(a.protocol)
        check_length(a.steps, a.epochs)
        check_device(a.device)
    except ValueError as e:
        p.error(str(e))
    # Every set is read and its recorded DataModule checked against the registry before any network trains: an
    # unsafe or foreign file, or one naming a class that is not a registered DataModule, stops the run here.
    payloads = {}
    for path in a.sets:
        try:
            payloads[str(path)] = load_distilled(path)
            if payloads[str(path)].get("datamodule", {}).get("class_path") is not None:
                check_datamodule_record(payloads[str(path)]["datamodule"], str(path))
        except (ExportError, ValueError) as e:
            p.error(str(e))
    tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)

    out = Path(a.out)
    json_path = out / f"{a.name}.json"
    options = {"protocol": a.protocol, "repeats": a.repeats, "epochs": a.epochs, "steps": a.steps}
    res: dict[str, Any] = {**options, "stamp": stamp(), "rows": []}
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if all(old.get(k) == v for k, v in options.items()):
            res["rows"] = old["rows"]  # resume: the same options, so finished cells stand
            res["stamp"] = old.get("stamp", res["stamp"])  # until a row is added, the saved run is what it shows
    digests = {str(path): set_digest(payloads[str(path)]) for path in a.sets}
    # A saved row stands only for the very set it scored: a path re-exported since (or a row that predates digests)
    # is evaluated again rather than reported under the new set's name.
    kept, stale = [], []
    for r in res["rows"]:
        current = digests.get(r["extra"]["path"], r["extra"].get("set_digest"))  # sets not named now stay as saved
        (kept if r["extra"].get("set_digest") == current else stale).append(r)
    for r in stale:
        print(f"{r['extra']['path']} {r['arch']}: the saved row scored another version of this file, re-running")
    res["rows"] = kept
    if json_path.is_file() and (stale or not res["rows"]):
        keep_previous(json_path)  # other options or other sets: the saved run is replaced, and kept aside
    done = {(r["extra"]["path"], r["arch"]) for r in kept}
    for path in a.sets:
        for arch in a.arch:
            if (str(path), arch) in done:
                print(f"{path} {arch}: done, skipped", flush=True)
                continue
            r = evaluate_distilled(
                path,
                protocol=a.protocol,
                arch=arch,
                repeats=a.repeats,
                root=a.root,
                epochs=a.epochs,
                steps=a.steps,
                device=a.device,
            )
            print(f"{path} {r}", flush=True)
            res["rows"].append(r.to_dict())
            res["stamp"] = stamp()
            with atomic_path(json_path) as tmp:
                tmp.write_text(json.dumps(res, indent=2))
    # The sets named now lead, in their command-line order (a re-run set would otherwise move after kept ones).
    order = {str(x): i for i, x in enumerate(a.sets)}
    res["rows"].sort(key=lambda r: order.get(r["extra"]["path"], len(order)))
    write_result(out / f"{a.name}.md", markdown(res))
    plot(res, out / f"{a.name}.png")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
