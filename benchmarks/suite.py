"""Run a named matrix of (method × dataset × IPC) cells, then write RESULTS.md and plots from every result present.

    python benchmarks/suite.py --matrix cpu            # FRePo and random real, MNIST/F-MNIST, IPC 1 and 10, CPU
    python benchmarks/suite.py --matrix gpu --threads 8
    python benchmarks/suite.py --report-only --readme  # only regenerate RESULTS.md, the plots and README's table
    python benchmarks/suite.py --list                  # the matrices and their cells

Each cell is ``benchmarks/distill_cell.py RECIPE <budget options> --out OUT`` in a subprocess; its JSON lands in
``OUT`` (default ``benchmarks/results/``) and the suite records the budget in it. A cell whose JSON already exists
with the same recipe and budget is skipped unless ``--force``, so an interrupted matrix resumes where it stopped.
JSON written by ``distill_cell.py`` run by hand (no recorded budget) counts as done when everything it records is
consistent with the budget (networks, krr network, evaluation steps, outer steps and minutes).

The report reads every JSON in ``OUT``: distill_cell results (a row for the method and one for random real) and
``lightning-distill evaluate`` files (a row per result). It writes ``RESULTS.md`` beside ``OUT`` (by default
``benchmarks/RESULTS.md``), ``OUT/accuracy_vs_ipc_<dataset>.png`` and ``OUT/time_per_step.png``; ``--readme``
replaces the block between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md with the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from matrices import MATRICES, Budget, Cell  # noqa: E402

DISTILL_CELL = BENCH / "distill_cell.py"
START, END = "<!-- results:start -->", "<!-- results:end -->"
DATASET_ORDER = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet"]
RANDOM = "random real"  # the series name of random real images, whether scored by distill_cell or RandomSubset


def papers() -> tuple[dict[str, Any], dict[str, Any]]:
    """The published numbers, from distill_cell.py (one table for both scripts)."""
    import distill_cell

    return distill_cell.PAPER, distill_cell.RANDOM_PAPER


# ---------------------------------------------------------------------------------------------------- running
def recipe_horizon(recipe: Path) -> int | None:
    """The recipe's ``trainer.max_steps``."""
    import yaml

    cfg = yaml.safe_load(recipe.read_text()) or {}
    return (cfg.get("trainer") or {}).get("max_steps")


def selects(pattern: str, cell: Cell, cells: Sequence[Cell]) -> bool:
    """Whether ``--only pattern`` picks ``cell``: a recipe's own name picks that recipe alone (``mnist_ipc1_cpu``
    is also part of ``fashion_mnist_ipc1_cpu``), anything else every recipe path that contains it."""
    names = {Path(c.recipe).stem for c in cells}
    if pattern in names or pattern.removesuffix(".yaml") in names:
        return Path(cell.recipe).stem == pattern.removesuffix(".yaml")
    return pattern in cell.recipe


def cell_done(path: Path, cell: Cell) -> tuple[bool, str]:
    """Whether ``path`` holds this cell's result at this budget, and why (or why not)."""
    if not path.is_file():
        return False, "no result yet"
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return False, f"unreadable result ({e})"
    recipe = Path(r.get("recipe", ""))
    if (recipe.parent.name, recipe.stem) != (Path(cell.recipe).parent.name, Path(cell.recipe).stem):
        return False, f"result is of another recipe ({recipe})"
    if "budget" in r:
        same = r["budget"] == cell.budget.to_dict()
        return same, "same budget" if same else f"recorded budget {r['budget']} differs"
    problems = _inconsistencies(r, cell)
    return not problems, "consistent with the budget (run by hand)" if not problems else "; ".join(problems)


def _inconsistencies(r: dict[str, Any], cell: Cell) -> list[str]:
    """What in a result without a recorded budget contradicts ``cell.budget`` (empty: it could be this budget)."""
    from lightning_distill.eval import get_protocol

    b, out = cell.budget, []
    try:
        krr, dc = r["distilled"]["krr"], r["distilled"]["dc"]
        if len(krr["accuracies"]) != b.repeats:
            out.append(f"{len(krr['accuracies'])} networks, not {b.repeats}")
        want_random = b.repeats if b.random_repeats is None else b.random_repeats
        got_random = len(r["random"]["krr"]["accuracies"]) if r["random"] else 0
        if got_random != want_random:
            out.append(f"{got_random} random-real networks, not {want_random}")
        want = {**get_protocol("krr").arch_kwargs, **(b.krr_arch_kwargs or {})}
        if krr["extra"].get("arch_kwargs") != want:
            out.append(f"krr network {krr['extra'].get('arch_kwargs')}, not {want}")
        if b.eval_steps is not None:
            out.append("--eval-steps is not recorded in the result")
        else:
            for proto, res, epochs in (("krr", krr, None), ("dc", dc, b.dc_epochs)):
                steps = get_protocol(proto).num_steps(res["num_images"], epochs)
                if res["steps"] != steps:
                    out.append(f"{proto} trained {res['steps']} steps, not {steps}")
        if len(r["curve"]) > b.curve:  # fewer is possible: a run that reaches its step horizon early snapshots less
            out.append(f"{len(r['curve'])} curve points for --curve {b.curve}")
        horizon = b.max_steps or recipe_horizon(cell.path)
        if horizon is not None and horizon <= 0:
            horizon = None  # a recipe with a TimeBudget: the run chose its horizon (recorded as max_steps)
        steps, minutes = r["steps"], r["distill_minutes"]
        if "max_steps" in r and horizon is not None and r["max_steps"] != horizon:
            out.append(f"cosine horizon {r['max_steps']} steps, not {horizon}")
        if horizon is not None and steps > horizon:
            out.append(f"{steps} outer steps, beyond {horizon}")
        # Distillation stops at the step horizon or at the wall-clock cap (measured from fit start, so the minutes
        # recorded, which include building the run, reach the cap); set-up may add a couple of minutes. A TimeBudget
        # recipe ends at the horizon it chose (recorded as max_steps), a little before the cap by design.
        reached = horizon if horizon is not None else r.get("max_steps")
        if not ((reached is not None and reached > 0 and steps >= reached) or minutes >= 0.98 * b.minutes):
            out.append(f"stopped after {minutes:.1f} min and {steps} steps, short of the budget")
        if minutes > 1.1 * b.minutes + 2:
            out.append(f"ran {minutes:.1f} min, more than {b.minutes:g}")
    except (KeyError, TypeError) as e:
        out.append(f"result lacks {e}")
    return out


def run_cell(cell: Cell, out: Path, workdir: Path, threads: int | None) -> bool:
    """Run one cell through distill_cell.py; on success record its budget in the JSON."""
    from lightning_distill.io import atomic_path

    recipe = cell.recipe if workdir.resolve() == REPO else str(cell.path)
    cmd = [sys.executable, str(DISTILL_CELL), recipe, *cell.budget.args(), "--out", str(out.resolve())]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"[suite] {' '.join(cmd)}", flush=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    started = time.time()
    rc = subprocess.run(cmd, cwd=workdir, env=env).returncode
    path = out / f"{cell.stem}.json"
    if rc != 0 or not path.is_file() or path.stat().st_mtime < started:
        print(f"[suite] {cell.stem} failed (exit status {rc})", flush=True)
        return False
    r = json.loads(path.read_text())
    r["budget"] = cell.budget.to_dict()  # what the resume check compares; distill_cell.py does not record it
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(r, indent=2))
    return True


def run_matrix(cells: Sequence[Cell], out: Path, workdir: Path, force: bool, threads: int | None) -> list[str]:
    """Run the cells not yet done; returns the stems of the cells that failed."""
    failed = []
    for i, cell in enumerate(cells, 1):
        if not cell.path.is_file():
            print(f"[suite] {i}/{len(cells)} {cell.recipe}: recipe not found, skipped", flush=True)
            failed.append(cell.stem)
            continue
        done, why = cell_done(out / f"{cell.stem}.json", cell)
        if done and not force:
            print(f"[suite] {i}/{len(cells)} {cell.stem}: done ({why}), skipped; --force re-runs it", flush=True)
            continue
        print(f"[suite] {i}/{len(cells)} {cell.stem}: running ({why})", flush=True)
        if not run_cell(cell, out, workdir, threads):
            failed.append(cell.stem)
    return failed


# ------------------------------------------------------------------------------------------------ collecting
@dataclass
class Row:
    """One line of the results table: one set (a method's or random real) scored under one or both protocols."""

    dataset: str
    ipc: int
    method: str  # the method's class name, or RANDOM
    krr: dict[str, Any] | None
    dc: dict[str, Any] | None
    paper: tuple[float, float] | None
    paper_protocol: str  # the protocol of the published number
    stamp: dict[str, Any]
    source: str  # the file the row comes from (the cell's .md where there is one)
    steps: int | None = None
    minutes: float | None = None
    ms_per_step: float | None = None
    recipe: str | None = None
    notes: list[str] = field(default_factory=list)
    other: dict[str, Any] | None = None  # a score under a third protocol (rtp, apm), said first in the notes

    @property
    def nets(self) -> str:
        counts = {len(r["accuracies"]) for r in (self.krr, self.dc, self.other) if r}
        return "/".join(str(c) for c in sorted(counts)) or "–"


def _eval_notes(res: dict[str, Any] | None) -> list[str]:
    """Departures of one evaluation from its protocol (a narrower network, fewer steps), said beside the number."""
    if not res:
        return []
    from lightning_distill.eval import get_protocol

    proto, notes = get_protocol(res["protocol"]), []
    kwargs = res.get("extra", {}).get("arch_kwargs")
    if res["arch"] != proto.arch:
        notes.append(f"{proto.name} net {res['arch']}")
    if kwargs is not None and kwargs != proto.arch_kwargs:
        changed = {k: v for k, v in kwargs.items() if proto.arch_kwargs.get(k) != v}
        notes.append(f"{proto.name} net " + ", ".join(f"{k} {v}" for k, v in changed.items()))
    default = proto.num_steps(res["num_images"])
    if res["steps"] != default:
        notes.append(f"{proto.name} {res['steps']} step{'s' * (res['steps'] != 1)} (protocol: {default})")
    return notes


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def cell_rows(r: dict[str, Any], path: Path) -> list[Row]:
    """The method's row and the random-real row of one distill_cell.py result."""
    source = path.with_suffix(".md").name if path.with_suffix(".md").is_file() else path.name
    recipe = Path(r["recipe"])
    recipe_name = _rel(recipe) if recipe.is_absolute() else str(recipe)
    common = {"dataset": r["dataset"], "ipc": r["ipc"], "stamp": r["stamp"], "source": source, "recipe": recipe_name}
    ours = Row(
        method=r["method"],
        krr=r["distilled"].get("krr"),  # an APM cell may score apm and dc only
        dc=r["distilled"].get("dc"),
        other=r["distilled"].get("apm"),  # apm_cell.py's score under APM's own protocol
        paper=tuple(r["paper"]) if r.get("paper") else None,
        paper_protocol="krr",
        steps=r["steps"],
        minutes=r["distill_minutes"],
        ms_per_step=r["ms_per_step"],
        **common,
    )
    if r.get("skipped_steps"):
        ours.notes.append(f"{r['skipped_steps']} skipped steps")
    rows = [ours]
    if r["random"]:  # empty when random real was scored in another cell (--random-repeats 0)
        rows.append(
            Row(
                method=RANDOM,
                krr=r["random"].get("krr"),
                dc=r["random"].get("dc"),
                other=r["random"].get("apm"),  # random real images with the same teacher's logits
                paper=tuple(r["random_paper_dc"]) if r.get("random_paper_dc") else None,
                paper_protocol="dc",
                **common,
            )
        )
    for row in rows:
        # Neither column holds a third protocol's score: the notes say it first, with its name (as for evaluations).
        first = [_other_note(row.other)] if row.other else []
        if row.other and row.method == RANDOM:
            first.append("apm: labelled with the distilled set's teacher's logits")
        row.notes = [*first, *row.notes]
        row.notes += [n for res in (row.krr, row.dc, row.other) if res is not None for n in _eval_notes(res)]
    return rows


def eval_rows(obj: dict[str, Any], path: Path) -> list[Row]:
    """One row per result of a ``lightning-distill evaluate`` JSON."""
    paper, random_paper = papers()
    rows = []
    for res in obj["results"]:
        e = res.get("extra", {})
        if "dataset" not in e or "ipc" not in e:
            continue  # a result without its set's description cannot be placed in the table
        method = RANDOM if e.get("method") == "RandomSubset" else e.get("method", "?")
        ipc, dataset = int(e["ipc"]), e["dataset"]
        if method == RANDOM:
            pub, proto = random_paper.get(dataset, {}).get(ipc), "dc"
        else:
            pub, proto = paper.get(method, {}).get(dataset, {}).get(ipc), "krr"
        row = Row(
            dataset=dataset,
            ipc=ipc,
            method=method,
            krr=res if res["protocol"] == "krr" else None,
            dc=res if res["protocol"] == "dc" else None,
            other=res if res["protocol"] not in ("krr", "dc") else None,
            paper=tuple(pub) if pub else None,
            paper_protocol=proto,
            stamp=obj["stamp"],
            source=path.name,
        )
        # Neither column holds a third protocol's score: the notes say it first, with its name.
        other = [_other_note(res)] if row.other else []
        # The run folder tells apart sets of one method (memories or pixels) that the method name does not.
        where = f" of {Path(e['path']).parent.name}" if e.get("path") else ""
        where += f" (step {e['step']})" if e.get("step") is not None else ""  # which export of that run folder
        where += f", distilled in {e['distilled_precision']}" if e.get("distilled_precision") else ""
        row.notes = [*other, f"lightning-distill evaluate ({e.get('method', '?')}){where}", *_eval_notes(res)]
        rows.append(row)
    return rows


def collect(out: Path) -> tuple[list[Row], dict[str, Any] | None, list[str], list[tuple[Path, dict[str, Any]]]]:
    """Rows from every JSON in ``out``, the speed.py result if present, the files that were not understood, and the
    cell results themselves (path and content: the full-data table reads their references)."""
    rows: list[Row] = []
    cells: list[tuple[Path, dict[str, Any]]] = []
    speed, ignored = None, []
    for path in sorted(out.glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue  # a cell still being scored (or one that died): distill_cell.py's progress, not a result
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            ignored.append(path.name)
            continue
        if not isinstance(obj, dict):
            ignored.append(path.name)
        elif "privacy" in path.name:
            continue  # membership-inference results (benchmarks/privacy.py) carry their own table and picture
        elif path.name.startswith(("sweep_", "continual_")):
            continue  # sweep.py's choices and continual.py's curves: sections of their own, from Markdown and picture
        elif "recipe" in obj and "distilled" in obj:
            rows += cell_rows(obj, path)
            cells.append((path, obj))
        elif isinstance(obj.get("results"), list) and "stamp" in obj:
            try:
                rows += eval_rows(obj, path)
            except ValueError:  # an evaluation under a protocol this process has not registered
                ignored.append(path.name)
        elif path.name == "speed.json":
            speed = obj
        elif "rows" not in obj:  # frepo_speed.json and the like have tables of their own
            ignored.append(path.name)
    rows.sort(key=_order)
    return rows, speed, ignored, cells


def _dataset_key(dataset: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)), dataset


def _order(r: Row) -> tuple:
    return *_dataset_key(r.dataset), r.ipc, r.method == RANDOM, r.method, r.stamp.get("date", "")


# ------------------------------------------------------------------------------------------------- reporting
def _other_note(res: dict[str, Any]) -> str:
    """A score under a protocol with no column of its own (rtp, apm), said first in a row's notes with its name."""
    from stamp import pm  # here: stamp imports torch, which --list and --dry-run need not

    return f"**{res['protocol']} protocol: {pm(res)}**"


def table(rows: Sequence[Row], link_dir: str) -> str:
    """The markdown table; ``link_dir`` is the results folder relative to the file the table goes into."""
    from stamp import pm  # here: stamp imports torch, which --list and --dry-run need not

    lines = [
        "| dataset | IPC | set | krr protocol | dc protocol | paper | distillation | nets | notes "
        "| hardware | torch | commit | date | details |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = f"{r.paper[0]} ± {r.paper[1]} ({r.paper_protocol})" if r.paper else "–"
        distil = "–"
        if r.steps is not None:
            distil = f"{r.steps} steps, {r.minutes:.1f} min, {r.ms_per_step:.0f} ms/step"
        s = r.stamp
        lines.append(
            f"| {r.dataset} | {r.ipc} | {r.method} | {pm(r.krr)} | {pm(r.dc)} | {paper} | {distil} | {r.nets} "
            f"| {'; '.join(r.notes)} | {s.get('hardware', '?')} | {s.get('torch', '?')} | {s.get('commit', '?')} "
            f"| {s.get('date', '?')} | [{r.source}]({link_dir}/{r.source}) |"
        )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[Row], dataset: str, path: Path) -> None:
    """Accuracy against IPC on one dataset: each method and random real under both protocols, the papers' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from stamp import write_figure  # here: it imports torch, which --list and --dry-run need not

    paper, random_paper = papers()
    mine = [r for r in rows if r.dataset == dataset]
    methods = sorted({r.method for r in mine if r.method != RANDOM}) + [RANDOM]
    colour = {m: ("0.45" if m == RANDOM else f"C{i}") for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ipcs: set[int] = set()
    for m in methods:
        for proto, style in (("krr", "o-"), ("dc", "s--")):
            latest: dict[int, dict[str, Any]] = {}  # the most recent measurement per IPC
            for r in sorted((r for r in mine if r.method == m), key=lambda r: r.stamp.get("date", "")):
                res = getattr(r, proto)
                if res:
                    latest[r.ipc] = res
            if not latest:
                continue
            xs = sorted(latest)
            ipcs.update(xs)
            ax.errorbar(
                xs,
                [latest[x]["mean"] for x in xs],
                yerr=[latest[x]["std"] for x in xs],
                fmt=style,
                color=colour[m],
                capsize=3,
                label=f"{m} ({proto}, ours)",
            )
        pub = random_paper.get(dataset, {}) if m == RANDOM else paper.get(m, {}).get(dataset, {})
        if pub:
            xs = sorted(pub)
            ipcs.update(xs)
            ax.errorbar(
                xs,
                [pub[x][0] for x in xs],
                yerr=[pub[x][1] for x in xs],
                fmt="*",
                markersize=12,
                color=colour[m],
                capsize=3,
                label=f"{m} (paper, {'dc' if m == RANDOM else 'krr'})",
            )
    ax.set_xscale("log")
    ax.set_xticks(sorted(ipcs))
    ax.set_xticklabels([str(i) for i in sorted(ipcs)])
    ax.set_xlabel("images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset}: accuracy against IPC (latest run per point)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    _footer(fig, mine)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    write_figure(fig, path)


def plot_time(rows: Sequence[Row], speed: dict[str, Any] | None, path: Path) -> None:
    """Milliseconds per outer step of every distilled cell (and of speed.py's configurations, when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from stamp import write_figure  # here: it imports torch, which --list and --dry-run need not

    cells = [r for r in rows if r.ms_per_step is not None]
    speed_rows = [r for r in (speed or {}).get("rows", []) if "median_ms" in r]
    panels = [p for p in ("cells", "speed") if (cells if p == "cells" else speed_rows)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4.5), squeeze=False)
    methods = sorted({r.method for r in cells} | {r["method"] for r in speed_rows})
    colour = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "cells":
            labels = [f"{r.dataset}\nIPC {r.ipc}\n{Path(r.recipe or '').stem}" for r in cells]
            ax.bar(range(len(cells)), [r.ms_per_step for r in cells], color=[colour[r.method] for r in cells])
            ax.set_title("distillation runs (wall clock incl. set-up / steps)", fontsize=9)
        else:
            labels = [f"{r['method']}\n{r['input']}\nIPC {r['ipc']}" for r in speed_rows]
            ax.bar(
                range(len(speed_rows)),
                [r["median_ms"] for r in speed_rows],
                color=[colour[r["method"]] for r in speed_rows],
            )
            ax.set_title(f"speed.py, {speed['device']}, profile {speed['profile']} (median)", fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("ms per outer step")
    if methods:
        from matplotlib.patches import Patch

        axes[0, 0].legend(handles=[Patch(color=colour[m], label=m) for m in methods], fontsize=7)
    _footer(fig, cells, extra=[speed["stamp"]] if speed else [])
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    write_figure(fig, path)


def _footer(fig: Any, rows: Sequence[Row], extra: Sequence[dict[str, Any]] = ()) -> None:
    stamps = {(s.get("hardware"), s.get("torch")) for s in [r.stamp for r in rows] + list(extra)}
    text = " | ".join(f"{h}, torch {t}" for h, t in sorted(stamps, key=str))
    fig.text(0.01, 0.01, text, fontsize=6)


def full_data_rows(cells: list[tuple[Path, dict[str, Any]]], link: str) -> list[str]:
    """The ceiling: networks trained on the whole training split, from the cells that trained one (``apm_cell.py
    --reference-epochs``) and their teacher pools; one table row each, from the latest cell, reference first.

    Latest by the date each result is stamped with (then by name), not by file time, which a clone does not keep:
    the report is the same from every checkout."""
    found: dict[tuple, str] = {}
    for path, r in sorted(
        cells, key=lambda cell: (cell[1].get("stamp", {}).get("date", ""), cell[0].name), reverse=True
    ):
        s, md = r.get("stamp", {}), path.with_suffix(".md").name
        where = f"{s.get('hardware', '?')} | {s.get('torch', '?')} | {s.get('commit', '?')} | {s.get('date', '?')}"
        source, key = f"[{md}]({link}/{md})", _dataset_key(r["dataset"])
        ref, pool = r.get("reference"), r.get("teachers") or {}
        if ref:
            found.setdefault(
                (*key, 0, ""),
                f"| {r['dataset']} | one {ref['arch']} {ref['arch_kwargs']} (the `dc` protocol's), DSA, "
                f"{ref['epochs']} epoch{'s' * (ref['epochs'] != 1)}, checkpoint chosen on validation | "
                f"**{ref['test_acc']:.2f}** | {ref['minutes']:.1f} min | {where} | {source} |",
            )
        if pool.get("test_acc") is not None:
            found.setdefault(
                (*key, 1, pool.get("folder") or ""),
                f"| {r['dataset']} | APM's teacher pool: {pool['teachers']} x {pool.get('arch')} "
                f"{pool.get('arch_kwargs') or ''}, mean of the pool | {pool['test_acc']:.2f} | "
                f"{pool['seconds'] / 60:.1f} min | {where} | {source} |",
            )
    return [found[k] for k in sorted(found)]


def krr_width_rows(rows: Sequence[Row], link: str) -> list[str]:
    """Table lines pairing a cell's krr score at its narrower network with ``lightning-distill evaluate``'s score of
    the very export (the same run folder and step) under the protocol's own network (the paper's width)."""
    from stamp import pm

    from lightning_distill.eval import get_protocol

    own = get_protocol("krr").arch_kwargs
    evaluated = {}
    for r in rows:
        e = (r.krr or {}).get("extra", {})
        if r.steps is None and e.get("path") and e.get("arch_kwargs") == own:
            evaluated[(Path(e["path"]).parent.name, e.get("step"))] = r
    lines = []
    for r in rows:
        if r.steps is None or r.method == RANDOM or not r.krr or r.krr["extra"].get("arch_kwargs") == own:
            continue
        paired = evaluated.get((Path(r.source).stem, r.steps))
        if paired is None:
            continue
        width = r.krr["extra"]["arch_kwargs"].get("width")
        paper = f"{r.paper[0]} ± {r.paper[1]}" if r.paper else "–"
        lines.append(
            f"| {r.dataset} | {r.ipc} | [{r.recipe}]({link}/{r.source}) | {r.steps} | {pm(r.krr)} (width {width}) "
            f"| {pm(paired.krr)} | {len(paired.krr['accuracies'])} | {paper} "
            f"| [{paired.source}]({link}/{paired.source}) |"
        )
    return lines


def report(out: Path, results_md: Path) -> tuple[list[Row], str]:
    """Write RESULTS.md and the plots from every result in ``out``; returns the rows and RESULTS.md's text."""
    from lightning_distill.io import atomic_path

    rows, speed, ignored, cells = collect(out)
    link = os.path.relpath(out.resolve(), results_md.resolve().parent)
    datasets = sorted({r.dataset for r in rows}, key=_dataset_key)
    for d in datasets:
        plot_accuracy(rows, d, out / f"accuracy_vs_ipc_{d}.png")
    if any(r.ms_per_step is not None for r in rows) or speed:
        plot_time(rows, speed, out / "time_per_step.png")
    parts = [
        "# Benchmark results",
        "",
        f"Generated by `python benchmarks/suite.py` from the {len(rows)} rows of the JSON results in "
        f"[`{_rel(out)}`]({link}); do not edit by hand. Measured numbers are test accuracy (%, mean ± std over "
        "fresh networks) under the `krr` protocol (FRePo/RCIG's, the methods' own) and the `dc` protocol; "
        "*paper* is the published ConvNet number under the protocol in brackets (random real: Zhao et al. 2021). "
        "*notes* lists every departure from a protocol (narrower networks, fewer steps): such numbers are not "
        "comparable with the papers'.",
        "",
        table(rows, link) if rows else "No results yet: run `python benchmarks/suite.py --matrix cpu`.",
        "",
    ]
    full = full_data_rows(cells, link)
    if full:
        parts += [
            "## The full training set: the ceiling",
            "",
            "Networks trained on the whole training split (validation split held out), tested on the test split: "
            "what every distilled set is measured against.",
            "",
            "| dataset | network | test accuracy (%) | training | hardware | torch | commit | date | details |",
            "|---|---|---|---|---|---|---|---|---|",
            *full,
            "",
        ]
    widths = krr_width_rows(rows, link)
    if widths:
        parts += [
            "## The krr network: the CPU cells' width against the paper's",
            "",
            "The CPU cells score the `krr` protocol with a narrower network than the paper's (width 64 for 128, half "
            "the scoring time); `lightning-distill evaluate <run>/distilled.pt --protocol krr` scored the same "
            "exported sets with the protocol's own network (the paper's width 128).",
            "",
            "| dataset | IPC | recipe | steps | krr, cell's network | krr, paper's network | nets | paper (krr) "
            "| details |",
            "|---|---|---|---|---|---|---|---|---|",
            *widths,
            "",
        ]
    if datasets:
        parts += ["## Accuracy against images per class", ""]
        parts += [f"![{d}]({link}/accuracy_vs_ipc_{d}.png)" for d in datasets] + [""]
    if any(r.ms_per_step is not None for r in rows) or speed:
        parts += ["## Time per outer step", "", f"![time per step]({link}/time_per_step.png)", ""]
    if (out / "speed.md").is_file():
        parts += [(out / "speed.md").read_text().replace("## ", "### ", 1), ""]
    if (out / "frepo_speed.md").is_file():
        parts += [f"FRePo at the official and CPU settings: [frepo_speed.md]({link}/frepo_speed.md).", ""]
    if (out / "speed_allocator.md").is_file():
        parts += [
            "## Hot spot: the CPU allocator, before and after",
            "",
            "`python benchmarks/speed.py --allocator both --name speed_allocator`: each configuration with glibc's "
            "allocator as shipped, then as `lightning_distill.runtime.tune_cpu_allocator` sets it (large blocks "
            "stay in the process instead of being mapped and page-faulted afresh every step), in turn in one run.",
            "",
            (out / "speed_allocator.md").read_text().replace("## ", "### ", 1),
            "",
        ]
    sweeps = sorted(out.glob("sweep_*.md"))
    if sweeps:
        parts += [
            "## How a cell's budget is spent: sweeps",
            "",
            "`python benchmarks/sweep.py <recipe> --minutes M --option 'NAME --key=value ...'`: short runs of one "
            "recipe, each with a few options changed, each fitting its whole schedule into the same minutes, scored "
            "on the validation split held out of the training images (never the test split). The change a sweep "
            "ranks first is then measured as a full cell, and kept only where it beats its recipe there.",
            "",
        ]
    for md in [*sweeps, *sorted(out.glob("cross_arch*.md")), *sorted(out.glob("continual_*.md"))]:
        text = md.read_text()
        parts += [text.replace("## ", "### ", 1) if md in sweeps else text, ""]
        if md.with_suffix(".png").is_file():
            parts += [f"![{md.stem}]({link}/{md.stem}.png)", ""]
    # Sub-folders hold measurements outside the matrix (e.g. more networks for one cell), each with its README.
    for sub in sorted(d for d in out.iterdir() if d.is_dir() and (d / "README.md").is_file()):
        parts += [(sub / "README.md").read_text().replace("# ", "## ", 1), ""]
    if ignored:
        parts += [f"Files not understood (ignored): {', '.join(ignored)}.", ""]
    text = "\n".join(parts)
    with atomic_path(results_md) as tmp:
        tmp.write_text(text)
    return rows, text


def replace_block(text: str, block: str) -> str | None:
    """``text`` with the block between the results markers replaced by ``block``; ``None`` without both markers."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return None
    return text[: i + len(START)] + "\n" + block.strip("\n") + "\n" + text[j:]


def update_readme(readme: Path, rows: Sequence[Row], out: Path) -> bool:
    """Put the table between README's markers; say so and leave the file alone where the markers are missing."""
    from lightning_distill.io import atomic_path

    link = os.path.relpath(out.resolve(), readme.resolve().parent)
    block = table(rows, link) if rows else "No measured results yet."
    new = replace_block(readme.read_text(), block)
    if new is None:
        print(f"[suite] {readme} has no {START} ... {END} block: README left unchanged", flush=True)
        return False
    with atomic_path(readme) as tmp:
        tmp.write_text(new)
    print(f"[suite] wrote the results table into {readme}", flush=True)
    return True


# ------------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the matrix (unless ``--report-only``), then the report; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", choices=sorted(MATRICES), help="which cells to run")
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only cells whose recipe path contains one of these (/mnist_ipc10); a recipe's whole name "
        "(mnist_ipc1_cpu_bf16_b256) selects that recipe alone, not others that contain it (fashion_mnist_...)",
    )
    p.add_argument("--force", action="store_true", help="re-run cells whose result already exists")
    p.add_argument("--out", default=str(BENCH / "results"), help="results folder (default benchmarks/results)")
    p.add_argument("--results-md", default=None, help="the report (default: RESULTS.md beside the results folder)")
    p.add_argument("--workdir", default=str(REPO), help="where cells run (their runs/bench/ goes there)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per cell")
    p.add_argument("--report-only", action="store_true", help="only write RESULTS.md, the plots (and README)")
    p.add_argument("--readme", action="store_true", help="also put the table between README.md's markers")
    p.add_argument("--readme-path", default=str(REPO / "README.md"))
    p.add_argument("--list", action="store_true", help="print the matrices and their cells")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    g = p.add_argument_group("budget overrides (default: the matrix's budget)")
    for f in dataclasses.fields(Budget):
        kind = str if f.name == "krr_arch_kwargs" else float if f.name == "minutes" else int
        g.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    a = p.parse_args(argv)

    if a.list:
        for m in MATRICES.values():
            print(f"{m.name}: {m.description}")
            for c in m.cells:
                print(f"    {c.recipe}  {' '.join(c.budget.args())}")
        return 0
    if not a.matrix and not a.report_only:
        p.error("give --matrix NAME (or --report-only, or --list)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if a.matrix and not a.report_only:
        over = {f.name: getattr(a, f.name) for f in dataclasses.fields(Budget) if getattr(a, f.name) is not None}
        if "krr_arch_kwargs" in over:
            over["krr_arch_kwargs"] = json.loads(over["krr_arch_kwargs"])
        cells = [dataclasses.replace(c, budget=dataclasses.replace(c.budget, **over)) for c in MATRICES[a.matrix].cells]
        if a.only:
            cells = [c for c in cells if any(selects(s, c, cells) for s in a.only)]
            if not cells:
                names = ", ".join(c.recipe for c in MATRICES[a.matrix].cells)
                p.error(f"--only {' '.join(a.only)} matches no cell of matrix {a.matrix!r}; its cells: {names}")
        if a.dry_run:
            for c in cells:
                done, why = cell_done(out / f"{c.stem}.json", c)
                print(f"{'skip' if done and not a.force else 'run '} {c.recipe} {' '.join(c.budget.args())}  ({why})")
            return 0
        failed = run_matrix(cells, out, Path(a.workdir), a.force, a.threads)
    results_md = Path(a.results_md) if a.results_md else out.resolve().parent / "RESULTS.md"
    rows, _ = report(out, results_md)
    print(f"[suite] {len(rows)} rows; wrote {results_md}", flush=True)
    if a.readme:
        update_readme(Path(a.readme_path), rows, out)
    if failed:
        print(f"[suite] failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
