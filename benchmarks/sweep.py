"""Choose how a cell spends its budget by measurement: short runs of one recipe with a few options changed, each
scored on the validation split held out of the training images (never the test split).

    python benchmarks/sweep.py recipes/frepo/mnist_ipc1_cpu_bf16.yaml --minutes 7 --repeats 2 \
        --krr-arch-kwargs '{"width": 64}' --threads 1 \
        --option 'lr1e-2 --model.init_args.syn_optimizer.init_args.lr=0.01' \
        --option "width64 --model.init_args.arch_kwargs='{\"width\": 64}'"

Every ``--option 'NAME --key=value ...'`` (one shell word, split as a shell would, so a JSON value keeps its quotes
inside single quotes) is one run: the recipe with those command-line overrides (``base``, the recipe as it is, always
runs first). The recipe's :class:`~lightning_distill.callbacks.TimeBudget` is set to ``--minutes``, so
each run fits its whole schedule (cosine horizon) into the short budget, as the full cell fits it into its own.

The distillation never sees the validation images (the DataModule holds them out of ``x_train`` with its seeded
``val_size``); each final set is scored on them under the ``krr`` protocol with ``--repeats`` networks. Writes
``benchmarks/results/sweep_<recipe>.{json,md,png}``, stamped, and keeps every finished run in
``sweep_<recipe>.partial.json`` as it lands: a sweep that dies is picked up at the next run it lacks (when made
with the same options; otherwise the partial is set aside under ``results/replaced/`` and the sweep starts anew).
A finished sweep run again with more ``--option`` runs makes only the new ones.

Two cores, two sweeps: each process takes some of the runs with its own ``--out`` (every ``--option``, and
``--only`` the runs it makes); then one invocation with every ``--option`` and ``--merge`` of their JSON files
(finished, partial, or set aside under ``replaced/``) takes the runs they made (same recipe, options and overrides;
each run keeps its own stamp) and makes only what none of them has. ``--name`` keeps a sweep of the same recipe under
other options (e.g. the full budget) apart from the first one's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import finish, keep_previous, pm, save_figure, score_set, stamp, trainer_args  # noqa: E402

from lightning_distill.callbacks import TimeBudget  # noqa: E402
from lightning_distill.cli import cli_main  # noqa: E402
from lightning_distill.eval import NO_FLIP_DATASETS  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402


def parse_options(specs: list[str]) -> dict[str, list[str]]:
    """``--option 'NAME --key=value ...'`` strings as ``{name: overrides}``, ``base`` (no overrides) first.

    One string per run because argparse would take each ``--key=value`` for an option of this script.
    """
    runs: dict[str, list[str]] = {"base": []}
    for spec in specs:
        name, *overrides = shlex.split(spec) or [""]
        if not name or name.startswith("-"):
            raise SystemExit(f"--option {spec!r}: start with the run's name, e.g. --option 'lr1e-2 --key=value'")
        if name in runs:
            raise SystemExit(f"--option {name}: the name is used twice (or is 'base', the recipe as it is)")
        if not overrides:
            raise SystemExit(f"--option {name}: give at least one override, e.g. --model.init_args.seed=1")
        bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
        if bad:
            raise SystemExit(f"--option {name}: overrides are written --key=value, got {bad}")
        runs[name] = overrides
    return runs


def _same_sweep(old: dict[str, Any], recipe: str, options: dict[str, Any]) -> bool:
    """Whether a sweep's JSON was made from ``recipe`` under ``options`` (its runs aside), so its runs compare."""
    return old.get("recipe") == recipe and {**old.get("options", {}), "runs": None} == {**options, "runs": None}


def _asked_runs(old: dict[str, Any], runs: dict[str, list[str]]) -> dict[str, Any]:
    """The runs of a sweep's JSON that ``runs`` asks for: the same name with the same overrides."""
    return {k: v for k, v in old.get("runs", {}).items() if runs.get(k) == v["overrides"]}


def _measured(old: dict[str, Any]) -> dict[str, Any]:
    """What a sweep's JSON says its runs measured (method, dataset, IPC, validation images)."""
    return {k: old[k] for k in ("method", "dataset", "ipc", "val_images") if k in old}


def reusable_runs(
    partial: Path, finished: Path, recipe: str, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(runs, what they measured)`` already made under these options: from the partial of a sweep that died, else
    from a finished sweep being extended with more ``--option`` runs (a run is reused when its name and overrides
    are the same).

    A partial made under other options is set aside under ``results/replaced/`` (never deleted); a finished result
    is replaced, and so kept there, when this sweep ends.
    """
    runs = options["runs"]
    for source in (partial, finished):
        if not source.is_file():
            continue
        old = json.loads(source.read_text())
        if _same_sweep(old, recipe, options):
            done = _asked_runs(old, runs)
            print(f"resuming from {source}: {', '.join(done) or 'no run'} done", flush=True)
            return done, _measured(old)
        print(f"{source} was made with other options: running every run anew", flush=True)
        if source == partial:
            keep_previous(partial)
    return {}, {}


def merge_runs(
    paths: list[Path], recipe: str, options: dict[str, Any], have: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(runs, what they measured)`` taken from other sweeps' JSON files (``--merge``): each asked-for run that
    ``have`` lacks and a file holds with the same overrides. A file of another recipe or other options is refused,
    not skipped: its runs do not compare with these."""
    runs, taken, measured = options["runs"], {}, {}
    for path in paths:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--merge {path}: cannot read it as a sweep's JSON ({err})") from err
        if not _same_sweep(old, recipe, options):
            raise SystemExit(
                f"--merge {path}: made from {old.get('recipe')!r} with options {old.get('options')}, not {recipe!r} "
                f"with { ({**options, 'runs': '...'}) }: merge only sweeps of the same recipe, minutes, repeats and "
                f"networks"
            )
        for name, run in _asked_runs(old, runs).items():
            if name not in have and name not in taken:
                taken[name] = run
        measured.update(_measured(old))
    return taken, measured


def distil(
    recipe: str, overrides: list[str], minutes: float, run_dir: Path, max_steps: int | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """One short run of ``recipe`` with ``overrides``, its TimeBudget set to ``minutes`` (``max_steps`` caps the
    horizon it chooses): ``(method, dm, record)``."""
    # The TimeBudget ends the run; max_time is only the hard stop behind it.
    args = ["--config", recipe, *overrides, *trainer_args(run_dir, (minutes + 2) * 60, max_steps)]
    cli = cli_main(args, run=False)
    budgets = [cb for cb in cli.trainer.callbacks if isinstance(cb, TimeBudget)]
    if not budgets:
        raise SystemExit(f"{recipe} has no TimeBudget callback: a sweep compares runs of equal wall-clock budgets")
    for cb in budgets:
        cb.minutes = float(minutes)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - t0
    steps = cli.trainer.global_step
    config = cli.model.config()
    record = {
        "overrides": overrides,
        "steps": steps,
        "horizon": config["horizon"],
        "distill_minutes": seconds / 60,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "precision": config.get("precision_resolved", "fp32"),  # what the network passes ran in
    }
    return cli.model, cli.datamodule, record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of each run")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="'NAME --key=value ...'",
        help="a run: its name, then its --key=value overrides of the recipe, as one quoted word",
    )
    p.add_argument("--repeats", type=int, default=2, help="krr networks per score")
    p.add_argument("--krr-arch-kwargs", default=None, help="JSON options of the krr evaluation network")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run's horizon (smoke tests)")
    p.add_argument("--eval-steps", type=int, default=None, help="override the krr protocol's steps (smoke tests)")
    p.add_argument("--out", default=None, help="folder for results (default benchmarks/results)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        type=Path,
        metavar="JSON",
        help="take the runs these sweeps' JSON files made (same recipe and options), e.g. a second process's",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="make only these runs (``base`` included only if named); the others are left to another process",
    )
    p.add_argument("--name", default=None, help="the result files' stem (default sweep_<method>_<recipe>)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.minutes <= 0:
        raise SystemExit(f"--minutes must be positive, got {a.minutes}")
    runs = parse_options(a.option)
    unknown = sorted(set(a.only or ()) - set(runs))
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: no such run; the runs are {', '.join(runs)}")
    tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    krr_kwargs = json.loads(a.krr_arch_kwargs) if a.krr_arch_kwargs else None
    stem = a.name or f"sweep_{Path(a.recipe).parent.name}_{Path(a.recipe).stem}"
    out = Path(a.out or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{stem}.partial.json"
    options = {
        "minutes": a.minutes,
        "repeats": a.repeats,
        "krr_arch_kwargs": krr_kwargs,
        "eval_steps": a.eval_steps,
        "max_steps": a.max_steps,
        "runs": runs,
    }
    res: dict[str, Any] = {"recipe": a.recipe, "options": options, "split": "val", "runs": {}}
    res["runs"], measured = reusable_runs(partial, out / f"{stem}.json", a.recipe, options)
    merged, measured_there = merge_runs(a.merge, a.recipe, options, res["runs"])
    if merged:
        print(f"merged from {', '.join(map(str, a.merge))}: {', '.join(merged)}", flush=True)
    res["runs"].update(merged)
    res["runs"] = {k: res["runs"][k] for k in runs if k in res["runs"]}  # in the order asked for
    res.update(measured_there, **measured)
    res.setdefault("stamp", stamp())

    for name, overrides in runs.items():
        if name in res["runs"] or (a.only is not None and name not in a.only):
            continue
        print(f"== {name}: {' '.join(overrides) or '(the recipe as it is)'}", flush=True)
        method, dm, record = distil(a.recipe, overrides, a.minutes, Path("runs/bench") / stem / name, a.max_steps)
        view = method.distilled_view()
        record["val"] = score_set(
            view.images.cpu(), view.labels.cpu(), dm.x_val.cpu(), dm.y_val.cpu(), "krr", repeats=a.repeats,
            num_classes=dm.num_classes, flip=dm.name not in NO_FLIP_DATASETS, steps=a.eval_steps,
            arch_kwargs=krr_kwargs,
        )  # fmt: skip
        record["stamp"] = stamp()
        res.update(method=type(method).__name__, dataset=dm.name, ipc=method.synthetic.ipc, val_images=len(dm.y_val))
        res["runs"][name] = record
        with atomic_path(partial) as tmp:  # a sweep takes an hour: keep each finished run
            tmp.write_text(json.dumps(res, indent=2))
    if not res["runs"]:
        raise SystemExit("no run was made or merged: name some with --only, or merge the sweeps that made them")
    res["best"] = best_configuration(res["runs"])[0]
    finish(out, stem, res, markdown, plot)


SEED_OPTION = "--model.init_args.seed="


def configurations(runs: dict[str, Any]) -> list[list[str]]:
    """The runs grouped by configuration: runs whose overrides match once the method's seed
    (``--model.init_args.seed=``; a run without it has the recipe's) is taken out are one configuration's draws."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, run in runs.items():
        rest = tuple(sorted(o for o in run["overrides"] if not o.startswith(SEED_OPTION)))
        groups.setdefault(rest, []).append(name)
    return list(groups.values())


def seed_groups(runs: dict[str, Any]) -> list[list[str]]:
    """:func:`configurations` with two or more seeds: how far the seed alone moves a score, beside which the other
    runs' differences are read."""
    return [g for g in configurations(runs) if len(g) > 1]


def best_configuration(runs: dict[str, Any]) -> list[str]:
    """The configuration with the highest validation score averaged over its seeds, its first run first: a sweep
    ranks settings, and naming the luckiest seed of one would rank a draw instead."""
    return max(configurations(runs), key=lambda g: group_mean(runs, g))


def group_mean(runs: dict[str, Any], group: list[str]) -> float:
    """A configuration's validation score: the mean of its seeds' means."""
    return sum(runs[k]["val"]["mean"] for k in group) / len(group)


def seed_lines(runs: dict[str, Any]) -> list[str]:
    """One Markdown paragraph per :func:`seed_groups` group: its runs and the range of their scores."""
    lines = []
    for group in seed_groups(runs):
        means = [runs[k]["val"]["mean"] for k in group]
        lines += [
            f"Seed spread: {', '.join(group)} differ only in the method's seed and scored {min(means):.1f}-"
            f"{max(means):.1f} ({max(means) - min(means):.1f} points); differences between one-seed runs smaller "
            "than that do not rank them.",
            "",
        ]
    return lines


def best_group(r: dict[str, Any]) -> list[str]:
    """The runs of the configuration a sweep result names best (its seeds), for the Markdown and the plot."""
    return next((g for g in configurations(r["runs"]) if r["best"] in g), [r["best"]])


def best_line(r: dict[str, Any]) -> str:
    """Which configuration scored best on validation, and over how many seeds."""
    group = best_group(r)
    if len(group) == 1:
        return f"Best on validation: **{r['best']}**."
    mean = group_mean(r["runs"], group)
    return f"Best on validation: **{r['best']}** ({mean:.1f}, the mean of its {len(group)} seeds: {', '.join(group)})."


def markdown(r: dict[str, Any]) -> str:
    s, o = r["stamp"], r["options"]
    rows = [
        f"| {'**' + k + '**' if k == r['best'] else k} | {' '.join(v['overrides']) or '(recipe)'} | "
        f"{v.get('precision', '–')} | {v['steps']} | "
        f"{v['ms_per_step']:.0f} | {pm(v['val'])} | {v['stamp']['date']} |"
        for k, v in r["runs"].items()
    ]
    return "\n".join(
        [
            f"## Sweep: {r['method']} · {r['dataset']} · IPC {r['ipc']} (`{r['recipe']}`), "
            f"{o['minutes']:g} min per run",
            "",
            f"Each run fits its whole schedule into {o['minutes']:g} minutes (TimeBudget). Scored on the "
            f"{r['val_images']} validation images held out of the training split (never seen by the distillation, "
            f"and not the test split), krr protocol, {o['repeats']} network(s), krr network "
            f"{o['krr_arch_kwargs'] or 'as the protocol has it'}. {s['hardware']}, torch {s['torch']}; last invoked "
            f"{s['date']} at commit {s['commit']} (each run's own stamp is in the JSON).",
            "",
            "| run | overrides | precision | steps | ms/step | val krr (%) | finished |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            best_line(r),
            "",
            *seed_lines(r["runs"]),
        ]
    )


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["runs"])
    means = [r["runs"][k]["val"]["mean"] for k in names]
    stds = [r["runs"][k]["val"]["std"] for k in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    best = best_group(r)
    ax.bar(names, means, yerr=stds, color=["C3" if k in best else "C0" for k in names])
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, lo - 3), min(100.0, max(m + s for m, s in zip(means, stds, strict=True)) + 1.5))
    ax.set_ylabel("validation accuracy (%, krr)")
    ax.set_title(f"{r['method']} {r['dataset']} IPC {r['ipc']}: {r['options']['minutes']:g} min per run")
    ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path, r["stamp"], bottom=0.05)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
