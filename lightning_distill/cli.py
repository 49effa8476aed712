"""The ``lightning-distill`` command: ``fit`` (LightningCLI over methods and real data) and ``evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

USAGE = """usage: lightning-distill {fit,validate,test,evaluate} ...

  lightning-distill fit --config recipes/random/mnist_ipc1.yaml     distil (LightningCLI; --help for all options)
  lightning-distill evaluate PATH --protocol dc --arch convnet --repeats 5
                                                                   train fresh networks on an exported set
"""


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Build the LightningCLI: methods and data chosen by class path (``class_path: FRePo`` works once imported)."""
    from lightning.pytorch.cli import LightningCLI

    import lightning_distill.callbacks  # noqa: F401  (makes short class names resolvable in recipes)
    import lightning_distill.synthetic  # noqa: F401
    from lightning_distill.data import RealDataModule
    from lightning_distill.methods import DistillationMethod

    # Methods optimise manually, so Lightning warns that a step checkpoint holds the state after the update. That
    # is the state we want (the set after step N, with global_step N, resumes exactly: see the contract tests).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return LightningCLI(
        DistillationMethod,
        RealDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def evaluate_main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """``lightning-distill evaluate``: print a table (mean ± std per network) and write JSON."""
    p = argparse.ArgumentParser(
        prog="lightning-distill evaluate", description="Train fresh networks on an exported distilled set."
    )
    p.add_argument("path", nargs="?", help="the distilled.pt written by ExportDistilled")
    p.add_argument("--distilled", dest="path_opt", help="same as PATH")
    p.add_argument("--protocol", default="dc", help="evaluation protocol: dc or krr (default dc)")
    p.add_argument("--arch", action="append", help="network(s) from the registry; repeat or comma-separate")
    p.add_argument("--repeats", type=int, default=5, help="fresh networks per architecture (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's total steps")
    p.add_argument("--root", default=None, help="data root holding the test split (default: as recorded)")
    p.add_argument("--data-path", default=None, help="file or folder of array/ImageFolder data (default: recorded)")
    p.add_argument("--arch-kwargs", default=None, help="network options as JSON, e.g. '{\"width\": 64}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--output", default=None, help="JSON file (default: <PATH stem>_eval_<protocol>.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(list(argv))
    path = a.path or a.path_opt
    if not path:
        p.error("give the distilled set: lightning-distill evaluate PATH")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")

    from lightning_distill.eval import evaluate_distilled, get_protocol
    from lightning_distill.nets import list_nets

    try:
        get_protocol(a.protocol)
    except ValueError as e:
        p.error(str(e))
    arch_kwargs = None
    if a.arch_kwargs:
        try:
            arch_kwargs = json.loads(a.arch_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--arch-kwargs must be a JSON object, e.g. '{{\"width\": 64}}': {e}")
        if not isinstance(arch_kwargs, dict):
            p.error(f"--arch-kwargs must be a JSON object, e.g. '{{\"width\": 64}}', got {a.arch_kwargs!r}")
    archs = [s for item in (a.arch or [None]) for s in ((item or "").split(",") if item else [None])]
    unknown = [s for s in archs if s is not None and s not in list_nets()]
    if unknown:
        p.error(f"unknown architecture {', '.join(unknown)}; choose from {', '.join(list_nets())}")

    results = []
    for arch in archs:
        r = evaluate_distilled(
            path,
            protocol=a.protocol,
            arch=arch,
            repeats=a.repeats,
            root=a.root,
            data_path=a.data_path,
            epochs=a.epochs,
            steps=a.steps,
            seed=a.seed,
            device=a.device,
            progress=not a.no_progress,
            arch_kwargs=arch_kwargs,
        )
        results.append(r.to_dict())
    print(format_table(results))
    out = Path(a.output) if a.output else Path(path).with_name(f"{Path(path).stem}_eval_{a.protocol}.json")
    from lightning_distill.provenance import stamp

    write_json(out, {"stamp": stamp(), "results": results})
    print(f"wrote {out}")
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table: one row per architecture."""
    lines = [
        "| dataset | ipc | method | arch | protocol | accuracy (%) | nets | steps | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r.get("extra", {})
        lines.append(
            f"| {e.get('dataset', '')} | {e.get('ipc', '')} | {e.get('method', '')} | {r['arch']} | {r['protocol']} "
            f"| {r['mean']:.2f} ± {r['std']:.2f} | {len(r['accuracies'])} | {r['steps']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write."""
    from lightning_distill.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-distill`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from lightning_distill.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # large CPU activations stay mapped between steps (see lightning_distill/runtime.py)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(2)
        return
    if argv[0] == "evaluate":
        from lightning_distill.export import ExportError

        try:
            evaluate_main(argv[1:])
        except (FileNotFoundError, ExportError) as e:
            sys.exit(f"lightning-distill evaluate: error: {e}")
        return
    cli_main(argv)


if __name__ == "__main__":
    main()
