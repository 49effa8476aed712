"""Distil one (method, dataset, IPC) cell from a recipe under a budget, then score it beside the random baseline.

    python benchmarks/distill_cell.py recipes/frepo/mnist_ipc1_cpu.yaml --minutes 30 --repeats 5 \
        --krr-arch-kwargs '{"width": 64}' --curve 3

Writes ``benchmarks/results/<recipe>.{json,md,png}``, each stamped with date, hardware, torch version and commit:
the distilled set's accuracy under the method's native ``krr`` protocol and the ``dc`` protocol (``--repeats``
networks each), the random-real baseline at the same IPC under both, the paper's number, steps done, ms per step,
and optionally an accuracy-against-minutes curve from snapshots taken during distillation.

Scoring takes longer than distilling on a CPU, so each score is kept in ``<recipe>.partial.json`` as it lands. A run
that died while scoring is picked up again: when that file and the run's ``distilled.pt`` are newer than the recipe
and were made under the same options, the set is scored from the export without distilling again, and only the
scores the partial lacks are computed (``--fresh`` distils anew; the old partial is then set aside, not deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import finish, keep_previous, pm, save_figure, score_set, stamp, trainer_args  # noqa: E402

from lightning_distill.cli import cli_main  # noqa: E402
from lightning_distill.eval import NO_FLIP_DATASETS  # noqa: E402
from lightning_distill.export import load_distilled, save_distilled  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402
from lightning_distill.synthetic import select_real  # noqa: E402

# Published ConvNet accuracies (%), method -> dataset -> ipc -> (mean, std). MNIST/F-MNIST FRePo numbers are
# unverified against the PDF (see shared/reference/methods_frepo_rcig.md §4).
PAPER = {
    "FRePo": {
        "mnist": {1: (93.0, 0.4), 10: (98.6, 0.1), 50: (99.2, 0.0)},
        "fashion_mnist": {1: (75.6, 0.3), 10: (86.2, 0.2), 50: (89.6, 0.1)},
        "cifar10": {1: (46.8, 0.7), 10: (65.5, 0.4), 50: (71.7, 0.2)},
        "cifar100": {1: (28.7, 0.1), 10: (42.5, 0.2), 50: (44.3, 0.2)},
        "tiny_imagenet": {1: (15.4, 0.3), 10: (25.4, 0.2)},
    },
    # RCIG (Loo et al., ICML 2023); MNIST/F-MNIST unverified against the PDF (methods_frepo_rcig.md §4).
    "RCIG": {
        "mnist": {1: (94.7, 0.5), 10: (98.9, 0.0), 50: (99.2, 0.0)},
        "fashion_mnist": {1: (79.8, 1.1), 10: (88.5, 0.2), 50: (90.2, 0.2)},
        "cifar10": {1: (53.9, 1.0), 10: (69.1, 0.4), 50: (73.5, 0.3)},
        "cifar100": {1: (39.3, 0.4), 10: (44.1, 0.4), 50: (46.7, 0.3)},
        "tiny_imagenet": {1: (25.6, 0.3), 10: (29.4, 0.2)},
    },
}
# Random real images under the DC protocol (Zhao et al., ICLR 2021, Table 1).
RANDOM_PAPER = {"mnist": {1: (64.9, 3.5), 10: (95.1, 0.9)}, "fashion_mnist": {1: (51.4, 3.8), 10: (73.8, 0.7)}}


class Snapshots(L.Callback):
    """Save the set every ``every_min`` minutes of distillation, at most ``count`` times (for the accuracy-against-
    minutes curve: a run that reaches the wall-clock cap would otherwise add one at the very end, the final set)."""

    def __init__(self, folder: Path, every_min: float, count: int) -> None:
        self.folder, self.every, self.count, self.start, self.taken = folder, every_min * 60, count, None, []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        elapsed = time.perf_counter() - self.start
        if len(self.taken) < self.count and elapsed >= self.every * (len(self.taken) + 1):
            self.save(trainer, pl_module, elapsed)

    def save(self, trainer: L.Trainer, pl_module: Any, elapsed: float) -> None:
        path = self.folder / f"step{trainer.global_step}.pt"
        payload = pl_module.export_payload()
        save_distilled(payload, path)
        self.taken.append({"minutes": elapsed / 60, "step": trainer.global_step, "path": str(path)})


def scoring_options(a: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what a cell's scores mean: a partial result is resumed only under the same ones."""
    return {
        "minutes": a.minutes,
        "repeats": a.repeats,
        "random_repeats": a.repeats if a.random_repeats is None else a.random_repeats,
        "krr_arch_kwargs": a.krr_arch_kwargs,
        "dc_epochs": a.dc_epochs,
        "eval_steps": a.eval_steps,
        "curve": a.curve,
    }


def resumable(partial: Path, export: Path, recipe: Path, a: argparse.Namespace) -> dict[str, Any] | None:
    """The partial result to resume, or None: it must be newer than the recipe, its export must exist, be no older
    than the recipe and no newer than the partial, and it must have been made under the options in ``a``."""
    if not (partial.is_file() and export.is_file() and recipe.is_file()):
        return None
    try:
        r = json.loads(partial.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(r, dict) or Path(r.get("recipe", "")) != recipe:
        return None
    if a.max_steps is not None and r.get("max_steps") != a.max_steps:
        return None
    recipe_t, export_t, partial_t = recipe.stat().st_mtime, export.stat().st_mtime, partial.stat().st_mtime
    if not (recipe_t < export_t <= partial_t + 1):  # the set written by this recipe, before the first score
        return None
    return r if r.get("scoring") == scoring_options(a) else None  # a partial without its options is not resumed


def why_not(run_dir: Path, a: argparse.Namespace) -> str:
    """A short reason why ``partial`` is not resumed (for the message)."""
    if a.fresh:
        return "--fresh"
    if not (run_dir / "distilled.pt").is_file():
        return f"no {run_dir / 'distilled.pt'}"
    return "another recipe, recipe edited since, other options, or an export newer than it"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the distillation")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps (cosine horizon)")
    p.add_argument("--repeats", type=int, default=5, help="networks per evaluation")
    p.add_argument(
        "--random-repeats",
        type=int,
        default=None,
        help="networks per evaluation of random real (default: --repeats; 0: not scored here, e.g. when another "
        "cell of the same dataset and IPC scores it)",
    )
    p.add_argument("--krr-arch-kwargs", default=None, help="JSON options of the krr evaluation network")
    p.add_argument("--dc-epochs", type=int, default=None, help="override the dc protocol's 1000 epochs")
    p.add_argument("--eval-steps", type=int, default=None, help="override both protocols' step counts (smoke tests)")
    p.add_argument("--curve", type=int, default=0, help="evaluate this many snapshots (1 net, krr) for a curve")
    p.add_argument("--out", default=None, help="folder for results (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="distil anew even when a partial result could be resumed")
    a = p.parse_args()
    tune_cpu_allocator()  # as the lightning-distill command does
    if a.threads:
        torch.set_num_threads(a.threads)
    name = Path(a.recipe).stem
    out = Path(a.out or Path(__file__).resolve().parent / "results")
    run_dir = Path("runs/bench") / f"{Path(a.recipe).parent.name}_{name}"
    krr_kwargs = json.loads(a.krr_arch_kwargs) if a.krr_arch_kwargs else None

    args = ["--config", a.recipe, *trainer_args(run_dir, a.minutes * 60, a.max_steps)]
    stem = f"{Path(a.recipe).parent.name}_{name}"
    partial = out / f"{stem}.partial.json"
    options = scoring_options(a)
    resumed = None if a.fresh else resumable(partial, run_dir / "distilled.pt", Path(a.recipe), a)
    if resumed is None and partial.is_file():
        print(f"{partial} cannot be resumed ({why_not(run_dir, a)}): distilling anew", flush=True)
        keep_previous(partial)  # set aside under results/replaced/, never silently dropped
    snaps = None
    if resumed is None and a.curve:
        snaps = Snapshots(run_dir / "snapshots", a.minutes / (a.curve + 1), a.curve)
    t0 = time.perf_counter()
    cli = cli_main(args, run=False)
    method, dm = cli.model, cli.datamodule
    if resumed is None:
        if snaps:
            cli.trainer.callbacks.append(snaps)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        distil_s, steps = time.perf_counter() - t0, cli.trainer.global_step
        view = method.distilled_view()  # what the export holds (an EMA of the set when a recipe adds one)
        x_syn, y_syn = view.images.cpu(), view.labels.cpu()
    else:
        payload = load_distilled(run_dir / "distilled.pt")
        x_syn, y_syn = payload["images"], payload["labels"]
        dm.prepare_data()
        dm.setup("fit")
        print(f"resuming {partial}: scoring {run_dir / 'distilled.pt'} without distilling again", flush=True)
    dataset, ipc, k = dm.name, method.synthetic.ipc, dm.num_classes
    flip = dataset not in NO_FLIP_DATASETS
    gen = torch.Generator().manual_seed(0)
    x_rand = select_real(dm.x_train.cpu(), dm.y_train.cpu(), k, ipc, gen)
    y_rand = torch.arange(k).repeat_interleave(ipc)
    x_te, y_te = dm.x_test.cpu(), dm.y_test.cpu()

    def score(x, y, protocol, kwargs=None, repeats=a.repeats, epochs=None):
        return score_set(
            x, y, x_te, y_te, protocol, repeats=repeats, num_classes=k, flip=flip, epochs=epochs, steps=a.eval_steps,
            arch_kwargs=kwargs,
        )  # fmt: skip

    if resumed is not None:
        res: dict[str, Any] = resumed
        res.setdefault("resumed", []).append(stamp())  # scores from here on were computed at this commit
    else:
        print(f"distilled {steps} steps in {distil_s / 60:.1f} min; evaluating", flush=True)
        res = {
            "recipe": a.recipe,
            "method": type(method).__name__,
            "dataset": dataset,
            "ipc": ipc,
            "steps": steps,
            "max_steps": cli.trainer.max_steps,  # the cosine horizon, so a resumed suite can tell budgets apart
            "horizon": method.config()["horizon"],  # the step horizon and how it was chosen (a TimeBudget says)
            "distill_minutes": distil_s / 60,
            "ms_per_step": 1000 * distil_s / max(steps, 1),
            "skipped_steps": method.skipped_steps,
            "stamp": stamp(),
            "paper": PAPER.get(type(method).__name__, {}).get(dataset, {}).get(ipc),
            "random_paper_dc": RANDOM_PAPER.get(dataset, {}).get(ipc),
        }
        res["scoring"] = options
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        # An evaluation takes up to hours on a CPU: keep what is scored so far if the run dies.
        with atomic_path(partial) as tmp:
            tmp.write_text(json.dumps(res, indent=2))

    random_repeats = options["random_repeats"]
    for key in ("distilled", "random"):
        res.setdefault(key, {})
    res.setdefault("curve", [])
    if snaps:
        res["snapshots"] = snaps.taken  # so that a resumed run can still score the curve
    checkpoint()
    for key, x, y, reps in [("distilled", x_syn, y_syn, a.repeats), ("random", x_rand, y_rand, random_repeats)]:
        if reps == 0:
            continue
        if "krr" not in res[key]:
            res[key]["krr"] = score(x, y, "krr", krr_kwargs, repeats=reps)
            checkpoint()
        if "dc" not in res[key]:
            res[key]["dc"] = score(x, y, "dc", repeats=reps, epochs=a.dc_epochs)
            checkpoint()
    for s in res.get("snapshots", [])[len(res["curve"]) :]:
        snap = load_distilled(s["path"])
        r = score(snap["images"], snap["labels"], "krr", krr_kwargs, repeats=1)
        res["curve"].append({**s, "krr_acc": r["mean"]})
        checkpoint()
    res.pop("snapshots", None)
    finish(out, stem, res, markdown, plot)


def markdown(r: dict[str, Any]) -> str:
    s = r["stamp"]
    paper = f"{r['paper'][0]} ± {r['paper'][1]}" if r["paper"] else "–"
    rp = f"{r['random_paper_dc'][0]} ± {r['random_paper_dc'][1]}" if r["random_paper_dc"] else "–"
    krr_arch = r["distilled"]["krr"]["extra"].get("arch_kwargs")
    return "\n".join(
        [
            f"## {r['method']} · {r['dataset']} · IPC {r['ipc']} (`{r['recipe']}`)",
            "",
            f"{r['steps']} outer steps in {r['distill_minutes']:.1f} min ({r['ms_per_step']:.0f} ms/step), "
            f"{r['skipped_steps']} skipped. {s['date']}, {s['hardware']}, torch {s['torch']}, commit {s['commit']}."
            + "".join(
                f" Scoring resumed {x['date']} ({x['hardware']}, commit {x['commit']}) after the run stopped."
                for x in r.get("resumed", [])
            ),
            "",
            "| set | krr protocol | dc protocol | paper |",
            "|---|---|---|---|",
            f"| {r['method']} (ours) | {pm(r['distilled']['krr'])} | {pm(r['distilled']['dc'])} | {paper} |",
            f"| random real (ours) | {pm(r['random'].get('krr'))} | {pm(r['random'].get('dc'))} | {rp} (dc) |",
            "",
            f"Networks per evaluation: {len(r['distilled']['krr']['accuracies'])} for the {r['method']} set, "
            + (
                f"{len(r['random']['krr']['accuracies'])} for random real"
                if r["random"]
                else "random real not scored in this cell (--random-repeats 0)"
            )
            + "; krr network: "
            f"{r['distilled']['krr']['arch']} {krr_arch}; dc network: convnet (width 128, instance norm).",
            *(
                [""]
                + [
                    f"- after {c['minutes']:.1f} min (step {c['step']}): krr {c['krr_acc']:.1f} % (1 net)"
                    for c in r["curve"]
                ]
                if r["curve"]
                else []
            ),
            "",
        ]
    )


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if r["curve"] else 1, figsize=(10 if r["curve"] else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    bars = [
        (label, r[key].get(proto), colour)
        for label, key, proto, colour in (
            ("ours krr", "distilled", "krr", "C0"),
            ("ours dc", "distilled", "dc", "C0"),
            ("random krr", "random", "krr", "C7"),
            ("random dc", "random", "dc", "C7"),
        )
        if r[key].get(proto)
    ]
    ax.bar(
        [b[0] for b in bars], [b[1]["mean"] for b in bars], yerr=[b[1]["std"] for b in bars], color=[b[2] for b in bars]
    )
    if r["paper"]:
        ax.axhline(r["paper"][0], color="C3", ls="--", label=f"paper {r['paper'][0]}")
        ax.legend(loc="lower right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{r['method']} {r['dataset']} IPC {r['ipc']}, {r['distill_minutes']:.0f} min")
    if r["curve"]:
        c = axes[0, 1]
        pts = [(x["minutes"], x["krr_acc"]) for x in r["curve"]] + [
            (r["distill_minutes"], r["distilled"]["krr"]["mean"])
        ]
        c.plot(
            [m for m, _ in pts], [acc for _, acc in pts], "o-"
        )  # the last point is the final set (mean of all networks)
        c.set_xlabel("minutes of distillation")
        c.set_ylabel("krr accuracy (%, 1 net)")
        c.set_title("accuracy against minutes")
    save_figure(fig, path, r["stamp"])


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
