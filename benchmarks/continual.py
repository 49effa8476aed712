"""The class-incremental continual-learning benchmark: several recipes through the whole protocol, one plot.

    python benchmarks/continual.py recipes/memories/mnist_ipc1_continual_cpu.yaml \
        recipes/frepo/mnist_ipc1_memories_continual_cpu.yaml recipes/frepo/mnist_ipc1_cpu_lr3e-3.yaml@400 \
        --orders 0,1,2 --protocol dc --repeats 2 --eval-steps 300 --arch-kwargs '{"width": 64}' --random first

For each recipe, every class order runs ``lightning-distill continual``'s protocol
(:func:`~lightning_distill.eval.continual.run_continual_recipe`): each step's classes are distilled from their own real
data with the recipe's method, a fresh network is trained on the memory so far and tested on the classes seen so far,
beside random real memory of the same storage. Settings not given here come from the recipe's
``ContinualLearningEval`` callback. Writes ``benchmarks/results/continual_<dataset>.{json,md,png}`` (or ``--name``),
stamped with date, hardware, torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import finish, stamp  # noqa: E402

from lightning_distill.eval.continual import run_continual_recipe, summarise, table  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+", help="fit recipes, one curve each; RECIPE@N distils N outer steps per step")
    p.add_argument("--orders", default=None, help="comma-separated class-order seeds (default: the recipe's)")
    p.add_argument("--steps", type=int, default=None, help="class-incremental steps (default: the recipe's)")
    p.add_argument("--protocol", default=None, help="evaluation protocol (default: the recipe's)")
    p.add_argument("--repeats", type=int, default=None, help="networks per step (default: the recipe's)")
    p.add_argument("--max-steps", type=int, default=None, help="outer steps per distillation step")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap of each step's distillation")
    p.add_argument("--eval-steps", type=int, default=None, help="override the protocol's optimiser steps")
    p.add_argument("--arch-kwargs", default=None, help="JSON options of the evaluation network")
    p.add_argument(
        "--random",
        choices=["all", "first", "none"],
        default="all",
        help="random-real baseline for every recipe, only the first (same budget for all: saves its evaluations), none",
    )
    p.add_argument("--name", default=None, help="output stem (default continual_<dataset>)")
    p.add_argument("--out", default=None, help="folder for results (default benchmarks/results)")
    p.add_argument("--run-dir", default="runs/bench/continual")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overrides", nargs="*", default=[], help="--key=value overrides for every recipe")
    a = p.parse_args()
    tune_cpu_allocator()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out = Path(a.out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for i, spec in enumerate(a.recipes):
        recipe, _, own_steps = spec.partition("@")
        print(f"== {recipe}", flush=True)
        results = run_continual_recipe(
            recipe,
            steps=a.steps,
            orders=[int(s) for s in a.orders.split(",")] if a.orders else None,
            protocol=a.protocol,
            repeats=a.repeats,
            max_steps=int(own_steps) if own_steps else a.max_steps,
            minutes=a.minutes,
            random_baseline=a.random == "all" or (a.random == "first" and i == 0),
            eval_steps=a.eval_steps,
            arch_kwargs=json.loads(a.arch_kwargs) if a.arch_kwargs else None,
            overrides=a.overrides,
            run_dir=Path(a.run_dir) / Path(recipe).stem,
        )
        print(table(results), flush=True)
        entries.append({"recipe": recipe, "summary": summarise(results), "runs": [r.to_dict() for r in results]})
        stem = a.name or f"continual_{entries[0]['runs'][0]['config']['dataset']}"
        # A whole protocol takes up to hours on a CPU: keep each recipe's curves as soon as they exist.
        with atomic_path(out / f"{stem}.partial.json") as tmp:
            tmp.write_text(json.dumps({"stamp": stamp(), "entries": entries}, indent=2))
    res = {"stamp": stamp(), "entries": entries}
    finish(out, stem, res, markdown, plot)


def markdown(res: dict[str, Any]) -> str:
    s = res["stamp"]
    lines = [
        f"## Class-incremental continual learning ({s['date']}, {s['hardware']}, torch {s['torch']}, "
        f"commit {s['commit']})",
        "",
    ]
    for e in res["entries"]:
        cfg = e["runs"][0]["config"]
        summ = e["summary"]
        n = len(summ["curve"]["mean"])
        lines += [
            f"### `{e['recipe']}`: {cfg['dataset']}, {cfg['steps']} steps, orders {summ['orders']}, protocol "
            f"{cfg['protocol']} ({cfg['repeats']} net(s) per step, eval steps {cfg['eval_steps'] or 'protocol'}), "
            f"distillation {cfg['max_steps'] or 'recipe'} outer steps per step",
            "",
            "| memory | " + " | ".join(f"step {i + 1}" for i in range(n)) + " | average |",
            "|---" * (n + 2) + "|",
        ]
        for key, name in (("curve", "distilled"), ("random_curve", "random real (same storage)")):
            if key not in summ:
                continue
            cells = [f"{m:.1f} ± {d:.1f}" for m, d in zip(summ[key]["mean"], summ[key]["std"], strict=True)]
            avg = summ["average" if key == "curve" else "random_average"]
            std = summ["average_std" if key == "curve" else "random_average_std"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg:.1f} ± {std:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, e in enumerate(res["entries"]):
        summ = e["summary"]
        steps = range(1, len(summ["curve"]["mean"]) + 1)
        label = Path(e["recipe"]).parent.name + "/" + Path(e["recipe"]).stem
        ax.errorbar(steps, summ["curve"]["mean"], yerr=summ["curve"]["std"], marker="o", color=f"C{i}", label=label)
        if "random_curve" in summ:
            ax.errorbar(
                steps,
                summ["random_curve"]["mean"],
                yerr=summ["random_curve"]["std"],
                marker="x",
                ls="--",
                color=f"C{i}",
                alpha=0.6,
                label=f"random real, same storage as {label}",
            )
    ax.set_xticks(list(steps))
    ax.set_xlabel("step (classes added)")
    ax.set_ylabel("test accuracy on seen classes (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
