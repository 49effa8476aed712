"""What every benchmark shares: the stamp (it lives in the package so that `lightning-distill evaluate` uses it too),
the trainer options its fit runs with, and the one way a benchmark writes its results, which never drops an earlier
result without saying so."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_distill.io import atomic_path
from lightning_distill.provenance import commit, hardware, stamp

__all__ = [
    "REPLACED_DIR",
    "commit",
    "finish",
    "hardware",
    "keep_previous",
    "page_head",
    "pm",
    "save_figure",
    "score_set",
    "stamp",
    "stamp_line",
    "trainer_args",
    "write_figure",
    "write_result",
]

#: Where a result that a new run replaces is kept, beside the results (the suite's report reads only the top folder).
REPLACED_DIR = "replaced"


def keep_previous(path: Path) -> Path | None:
    """Move an existing ``path`` to ``<its folder>/replaced/<stem>.<UTC time><suffix>`` and say so; ``None`` if none.

    A re-run of a benchmark (by hand, or ``suite.py --force``) thus replaces the result that the report shows
    while the earlier figures stay on disk, dated, for comparison.
    """
    path = Path(path)
    if not path.exists():
        return None
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    kept = path.parent / REPLACED_DIR / f"{path.stem}.{when}{path.suffix}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, kept)
    print(f"replacing {path}; the previous file is kept as {kept}", flush=True)
    return kept


def write_result(path: Path, text: str) -> Path:
    """Write one result file atomically; an existing one is first kept by :func:`keep_previous`."""
    path = Path(path)
    keep_previous(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def trainer_args(run_dir: Path | str, seconds: float, max_steps: int | None = None) -> list[str]:
    """The trainer options every benchmark fits a recipe with: its run folder, no logger and no progress bar (the
    benchmark logs what it measures), a wall-clock stop after ``seconds`` (Lightning's ``DD:HH:MM:SS``) and, when
    given, a step cap."""
    s = int(seconds)
    return [
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=false",
        f"--trainer.max_time=00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}",
        "--trainer.enable_progress_bar=false",
        *([f"--trainer.max_steps={max_steps}"] if max_steps else []),
    ]


def finish(
    out: Path,
    stem: str,
    res: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Write a finished result as ``<stem>.json``, ``.md`` and (with ``plot``) ``.png``, each keeping the file it
    replaces (:func:`keep_previous`); then drop the run's ``<stem>.partial.json``, whose scores the JSON now holds,
    and print the Markdown."""
    write_result(out / f"{stem}.json", json.dumps(res, indent=2))
    (out / f"{stem}.partial.json").unlink(missing_ok=True)
    write_result(out / f"{stem}.md", markdown(res))
    if plot is not None:
        keep_previous(out / f"{stem}.png")
        plot(res, out / f"{stem}.png")
    print(markdown(res))


def started(argv: list[str] | None) -> dict[str, Any]:
    """The head of a result: its stamp and the arguments it ran with (``argv``, or the command line's)."""
    return {"stamp": stamp(), "argv": sys.argv[1:] if argv is None else argv}


def finish_at(
    out: Path | None,
    res: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """:func:`finish` to ``OUT.json``, ``OUT.md`` (and ``OUT.png`` with ``plot``) for a script's ``--out OUT``
    (nothing when it is ``None``)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        finish(out.parent, out.name, res, markdown, plot)


def pm(r: dict[str, Any] | None) -> str:
    """A score as ``mean ± std`` over its networks; one network's score alone (its std of 0 would claim a spread
    nothing measured); ``–`` for none."""
    if not r:
        return "–"
    return f"{r['mean']:.1f}" if len(r.get("accuracies", ())) == 1 else f"{r['mean']:.1f} ± {r['std']:.1f}"


def stamp_line(s: dict[str, Any]) -> str:
    """A stamp as one line for a figure: date · hardware · torch · commit."""
    return f"{s['date']} · {s['hardware']} · torch {s['torch']} · {s['commit']}"


def page_head(title: str, res: dict[str, Any], script: str, where: str = "") -> list[str]:
    """The first lines of a script's result page: its title, then its stamp, ``where`` it ran (e.g. ``; device
    `cpu```) and the command that made it (``res['argv']``, as :func:`started` recorded it)."""
    return [
        f"# {title}",
        "",
        f"{stamp_line(res['stamp'])}{where}. `python benchmarks/{script} {' '.join(res['argv'])}`.",
        "",
    ]


def save_figure(fig: Any, path: Path, s: dict[str, Any], bottom: float = 0.04) -> None:
    """Stamp a benchmark's figure with its run (date, hardware, torch, commit) along the bottom, lay it out above
    ``bottom`` (a fraction of its height), write it and close it (a caller that plots many keeps none open)."""
    fig.text(0.01, 0.01, stamp_line(s), fontsize=7)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    write_figure(fig, path)


def write_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG atomically (a crash leaves the previous picture, never a truncated one) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def score_set(
    x: Any,
    y: Any,
    x_test: Any,
    y_test: Any,
    protocol: str,
    *,
    repeats: int,
    num_classes: int,
    flip: bool,
    epochs: int | None = None,
    steps: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score one set the way every cell does: ``repeats`` fresh networks trained on ``(x, y)`` under ``protocol``
    (``epochs``/``steps``/``arch_kwargs`` override it), tested on ``(x_test, y_test)``, on CUDA when there is one.

    The result is printed as it comes (a cell's scoring runs for tens of minutes; its log says how far it got) and
    returned as plain data for the result file.
    """
    import torch

    from lightning_distill.eval import train_on_distilled

    r = train_on_distilled(
        x,
        y,
        x_test,
        y_test,
        protocol=protocol,
        repeats=repeats,
        num_classes=num_classes,
        flip=flip,
        epochs=epochs,
        steps=steps,
        arch_kwargs=arch_kwargs,
        device="cuda" if torch.cuda.is_available() else "cpu",
        progress=False,
    )
    print(f"  {protocol}: {r}", flush=True)
    return r.to_dict()
