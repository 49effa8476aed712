"""Membership inference, FRePo's privacy application: a distilled MNIST chunk against the real chunk it came from.

    python benchmarks/privacy.py --minutes 15 --max-steps 800 --steps 100,250,500,1000,2000,4000 \
        --arch-kwargs '{"width": 32}' --batch-size 256 --data-root ../shared/datasets

1. Distils chunk 0 (2000 images) of MNIST's training split with ``recipes/frepo/mnist_ipc10_chunk_cpu_privacy.yaml``
   under a wall-clock budget (``--minutes``, ``--max-steps`` the cosine horizon), unless ``--distilled`` names an
   export to reuse. The export records its members (``member_indices``).
2. Sweeps both sets with :func:`lightning_distill.eval.privacy.privacy_sweep`: one fresh network per set, trained at
   a constant learning rate under the ``krr`` protocol (with the CPU choices given), scored at every step count of
   ``--steps``: test accuracy and the AUC of five attacks (loss threshold, logistic regression, MLP, random forest,
   k-NN) at telling the 2000 members from the test split.
3. Writes ``benchmarks/results/<name>.{json,md,png}``, stamped with date, hardware, torch version and commit, and a
   ``.partial.json`` after each sweep so a run that dies keeps what it measured.

The issue's target: the distilled set's network keeps its best AUC at or below 0.55 at every step count while the
real chunk's exceeds 0.6 as it trains, at a test accuracy within 3 points of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp, stamp_line, trainer_args, write_result  # noqa: E402

from lightning_distill.cli import cli_main  # noqa: E402
from lightning_distill.eval import NO_FLIP_DATASETS, get_protocol, test_split_for  # noqa: E402
from lightning_distill.eval.privacy import PrivacyResult, member_split_for, privacy_sweep  # noqa: E402
from lightning_distill.eval.privacy_command import format_privacy_table, privacy_figure, save_figure  # noqa: E402
from lightning_distill.export import load_distilled  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402

RECIPE = "recipes/frepo/mnist_ipc10_chunk_cpu_privacy.yaml"
#: The issue's target for the distilled set's best AUC, the real chunk's, and the accuracy gap (points).
TARGET = {"distilled_auc_at_most": 0.55, "real_auc_above": 0.6, "accuracy_gap_at_most": 3.0}


def distil(recipe: str, run_dir: Path, minutes: float, max_steps: int | None, data_root: str | None) -> dict[str, Any]:
    """Run the recipe under the budget; returns where the export is and how far distillation got."""
    args = [
        "--config",
        recipe,
        *trainer_args(run_dir, minutes * 60, max_steps),
        *([f"--data.init_args.root={data_root}", "--data.init_args.download=false"] if data_root else []),
    ]
    start = time.perf_counter()
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    steps = cli.trainer.global_step
    return {
        "recipe": recipe,
        "path": str(run_dir / "distilled.pt"),
        "steps": steps,
        "max_steps": cli.trainer.max_steps,
        "minutes": seconds / 60,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "skipped_steps": cli.model.skipped_steps,
    }


def verdict(results: list[PrivacyResult]) -> dict[str, Any]:
    """The issue's target checked on the measured sweeps (per step count, and overall)."""
    by_name = {r.name: r for r in results}
    if not {"distilled", "real"} <= set(by_name):
        return {}
    dist, real = by_name["distilled"].points, by_name["real"].points
    rows = [
        {
            "steps": d.steps,
            "distilled_best_auc": d.best_auc,
            "real_best_auc": r.best_auc,
            "accuracy_gap": r.accuracy - d.accuracy,
        }
        for d, r in zip(dist, real, strict=True)
    ]
    return {
        "target": TARGET,
        "rows": rows,
        "distilled_auc_held": all(x["distilled_best_auc"] <= TARGET["distilled_auc_at_most"] for x in rows),
        "real_auc_exceeded": any(x["real_best_auc"] > TARGET["real_auc_above"] for x in rows),
        "final_accuracy_gap": rows[-1]["accuracy_gap"],
        "best_accuracy_gap": max(r.accuracy for r in real) - max(d.accuracy for d in dist),
    }


def markdown(record: dict[str, Any], results: list[PrivacyResult]) -> str:
    s, d, v = record["stamp"], record["distillation"], record.get("verdict") or {}
    proto = record["protocol"]
    lines = [
        f"## Membership inference · FRePo · MNIST chunk of {results[0].num_members} · IPC 10 (`{d['recipe']}`)",
        "",
        f"Distillation: {d['steps']} outer steps in {d['minutes']:.1f} min ({d['ms_per_step']:.0f} ms/step) "
        f"(cosine horizon {d['max_steps']}), {d.get('skipped_steps', 0)} skipped. "
        f"{s['date']}, {s['hardware']}, torch {s['torch']}, commit {s['commit']}.",
        "",
        f"Evaluation networks: {results[0].arch} {results[0].extra['arch_kwargs']}, protocol `{proto['name']}` "
        f"(Adam {proto['lr']:g}, constant lr, {proto['loss']} loss, batch ≤ {proto['batch_size']}, "
        f"augmentation {proto['augment']}), one network per set, seed {results[0].extra['seed']}; attacks scored on "
        f"{results[0].extra['test_fraction']:.0%} of a balanced member/non-member sample (members: the chunk; "
        f"non-members: the test split). Training time: "
        + ", ".join(f"{r.name} {r.extra['train_seconds'] / 60:.1f} min" for r in results)
        + ".",
        "",
        format_privacy_table(results),
        "",
        "Step 0 is the untrained network: what the attacks get from differences between the chunk and the test split "
        "alone (the same for both sets).",
        "",
    ]
    if v:
        t = v["target"]
        lines += [
            "| steps | distilled best AUC | real best AUC | accuracy gap (real − distilled, points) |",
            "|---|---|---|---|",
            *(
                f"| {x['steps']} | {x['distilled_best_auc']:.3f} | {x['real_best_auc']:.3f} "
                f"| {x['accuracy_gap']:+.2f} |"
                for x in v["rows"]
            ),
            "",
            f"Target: distilled best AUC ≤ {t['distilled_auc_at_most']} at every step count: "
            f"**{'held' if v['distilled_auc_held'] else 'not held'}**; real best AUC > {t['real_auc_above']} as it "
            f"trains: **{'yes' if v['real_auc_exceeded'] else 'no'}**; accuracy gap ≤ {t['accuracy_gap_at_most']} "
            f"points: final {v['final_accuracy_gap']:+.2f}, best-vs-best {v['best_accuracy_gap']:+.2f}.",
            "",
        ]
    if record.get("command"):
        lines += [f"Reproduce: `{record['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--distilled", default=None, help="score this export instead of distilling")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the distillation")
    p.add_argument("--max-steps", type=int, default=800, help="the recipe's max_steps (cosine horizon)")
    p.add_argument("--steps", default="100,250,500,1000,2000,4000", help="step counts of the sweep")
    p.add_argument("--arch-kwargs", default='{"width": 32}', help="JSON options of the krr evaluation network")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch (krr: 500)")
    p.add_argument("--data-root", default=os.environ.get("LIGHTNING_DISTILL_DATA"), help="folder holding MNIST/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="privacy_frepo_mnist_chunk")
    p.add_argument("--out", default=None, help="folder for results (default benchmarks/results)")
    a = p.parse_args()
    tune_cpu_allocator()  # as the lightning-distill command does
    torch.set_num_threads(a.threads)
    out = Path(a.out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)

    if a.distilled:
        payload = load_distilled(a.distilled)
        distillation = {"recipe": a.recipe, "path": a.distilled, "steps": payload.get("step"), "max_steps": None,
                        "minutes": float("nan"), "ms_per_step": float("nan"), "reused": True}  # fmt: skip
    else:
        distillation = distil(a.recipe, Path("runs/bench") / a.name, a.minutes, a.max_steps, a.data_root)
        print(f"distilled {distillation['steps']} steps in {distillation['minutes']:.1f} min", flush=True)
    payload = load_distilled(distillation["path"])
    x_members, y_members = member_split_for(payload, root=a.data_root)
    x_test, y_test = test_split_for(payload, root=a.data_root)
    # CPU choice: batch 256 (FRePo's attack script trains the distilled set at min(N, 256), the real chunk at 1024).
    protocol = dataclasses.replace(get_protocol("krr"), name=f"krr-b{a.batch_size}", batch_size=a.batch_size)
    steps = [int(s) for s in a.steps.split(",")]
    common: dict[str, Any] = dict(
        protocol=protocol,
        steps=steps,
        num_classes=int(payload["num_classes"]),
        flip=payload["dataset"] not in NO_FLIP_DATASETS,
        arch_kwargs=json.loads(a.arch_kwargs) if a.arch_kwargs else None,
        seed=a.seed,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=False,
    )
    info = {k: payload.get(k) for k in ("dataset", "ipc", "method", "label_kind", "step")}
    command = "python " + " ".join(sys.argv)  # how to reproduce this run
    record: dict[str, Any] = {"stamp": stamp(), "command": command, "distillation": distillation, "results": []}
    results: list[PrivacyResult] = []
    for name, images, labels in (("distilled", payload["images"], payload["labels"]), ("real", x_members, y_members)):
        r = privacy_sweep(images, labels, x_members, y_members, x_test, y_test, name=name, **common)
        r.extra.update(info)
        results.append(r)
        record["protocol"] = r.extra["protocol"]
        record["results"] = [x.to_dict() for x in results]
        print(format_privacy_table([r]), flush=True)
        with atomic_path(out / f"{a.name}.partial.json") as tmp:  # keep what is measured if the run dies
            tmp.write_text(json.dumps(record, indent=2))
    record["verdict"] = verdict(results)
    write_result(out / f"{a.name}.json", json.dumps(record, indent=2))
    (out / f"{a.name}.partial.json").unlink(missing_ok=True)
    text = markdown(record, results)
    write_result(out / f"{a.name}.md", text)
    title = f"FRePo MNIST chunk, IPC 10 · {stamp_line(record['stamp'])}"
    save_figure(privacy_figure(results, title), out / f"{a.name}.png")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
