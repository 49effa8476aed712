"""``lightning-distill teachers --config RECIPE``: build (or find in the cache) the teacher pool a recipe needs.

The recipe is read exactly as ``lightning-distill fit`` reads it (its DataModule and the method's ``teachers``,
``teacher_dir``), so the pool built here is the one ``fit`` looks for. Teachers already in the pool's folder are
kept; missing ones are trained one after another with Lightning's progress bar, each written as soon as it is done,
so an interrupted build resumes where it stopped. Prints where the pool is and what it scores (validation accuracy
chose each checkpoint; test accuracy is reported only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any


def teachers_parser() -> argparse.ArgumentParser:
    """The ``teachers`` command line; other options (``--data.init_args.root=...``) go to the recipe as in ``fit``."""
    p = argparse.ArgumentParser(
        prog="lightning-distill teachers",
        description="Train the teacher pool that a recipe's method needs (APM), or find it in the cache. Further "
        "options override the recipe as in `lightning-distill fit` (e.g. --data.init_args.root=DIR, "
        "--model.init_args.teachers.num_teachers=5).",
    )
    p.add_argument("--config", required=True, help="the recipe (YAML) the pool is for")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--json", default=None, help="also write the pool's summary to this JSON file")
    p.add_argument("--no-progress", "--no_progress", action="store_true", help="hide the progress bar")
    return p


def teachers_main(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``lightning-distill teachers``; returns the pool's summary (see :meth:`TeacherPool.summary`).

    Raises:
        ValueError: a recipe whose method has no teacher pool, or a pool that does not match (one line each).
    """
    from lightning_distill.cli import cli_main
    from lightning_distill.components.teachers import load_teacher_pool
    from lightning_distill.eval.distilled import check_device

    args, rest = teachers_parser().parse_known_args(list(argv))
    check_device(args.device)
    cli = cli_main(["--config", args.config, "--trainer.logger=false", *rest], run=False)
    method, dm = cli.model, cli.datamodule
    spec = getattr(method, "teachers", None)
    if spec is None or not hasattr(spec, "num_teachers"):
        raise ValueError(
            f"{args.config}: the method {type(method).__name__} uses no teacher pool (only APM-style methods do): "
            "pass a recipe from recipes/apm/"
        )
    dm.setup("fit")
    start = time.perf_counter()
    pool = load_teacher_pool(
        dm,
        spec,
        folder=getattr(method, "teacher_dir", None),
        build=True,
        device=args.device,
        progress=not args.no_progress,
        how_to_build=f"lightning-distill teachers --config {args.config}",
    )
    summary = {**pool.summary(), "dataset": dm.name, "recipe": args.config, "seconds_this_run": 0.0}
    summary["seconds_this_run"] = time.perf_counter() - start

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} %"

    net = f"{spec.arch} {spec.arch_kwargs or ''}".strip()
    print(
        f"teacher pool: {summary['teachers']} x {net} on {dm.name} in {summary['folder']}"
        f"\n  validation accuracy {pct(summary['val_acc'])} (chose each checkpoint), test accuracy "
        f"{pct(summary['test_acc'])} (reported only), {summary['seconds']:.0f} s of training in all, "
        f"{summary['seconds_this_run']:.0f} s in this run"
    )
    if args.json:
        from lightning_distill.io import atomic_path
        from lightning_distill.provenance import stamp

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({**summary, "stamp": stamp()}, indent=2))
    return summary
