"""``lightning-distill privacy PATH``: membership-inference AUC beside accuracy, for an exported set and its real chunk.

Prints a table (one row per set and step count), writes JSON stamped like every result and draws attack AUC and test
accuracy against training steps for both sets. The computation is :func:`~lightning_distill.eval.privacy.
evaluate_privacy`; this module parses the command line and writes the results.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_distill.eval.privacy import ATTACKS, FREPO_STEPS, PrivacyResult

#: How the sets are drawn in the figure: the distilled set, and the real chunk it came from.
_STYLE = {"distilled": ("tab:blue", "o"), "real": ("tab:red", "s")}


def privacy_parser() -> argparse.ArgumentParser:
    """The ``privacy`` command line; options may be spelled with ``-`` or ``_``."""
    p = argparse.ArgumentParser(
        prog="lightning-distill privacy",
        description="Train fresh networks on an exported set and on the real chunk it was distilled from, for a "
        "sweep of step counts; after each, attack the network's outputs (members: the chunk; non-members: the test "
        "split) and report each attack's AUC beside test accuracy.",
    )
    p.add_argument("path", help="the distilled.pt written by ExportDistilled (distilled from a member chunk)")

    def opt(name: str, **kwargs: Any) -> None:
        p.add_argument(f"--{name}", *([f"--{name.replace('-', '_')}"] if "-" in name else []), **kwargs)

    opt("protocol", default="krr", help="a registered protocol name or a protocol as a JSON mapping (default: krr)")
    opt(
        "steps",
        default=",".join(map(str, FREPO_STEPS)),
        help="comma-separated step counts; 0: untrained (default: FRePo's)",
    )
    opt(
        "nonmembers",
        choices=("test", "train"),
        default="test",
        help="non-members: the test split (FRePo's) or training images outside the members (their own distribution)",
    )
    opt("arch", default=None, help="network registry name (default: the protocol's network)")
    opt("arch-kwargs", default=None, help="network options as a JSON object, e.g. '{\"width\": 32}'")
    opt("keep-schedule", action="store_true", help="keep the protocol's lr schedule (default: constant lr)")
    opt("no-baseline", action="store_true", help="score the distilled set only, not the real chunk")
    opt("attacks", default=",".join(ATTACKS), help=f"comma-separated attacks (default: {','.join(ATTACKS)})")
    opt("test-fraction", type=float, default=0.5, help="share of members/non-members the attacks are scored on")
    opt("seed", type=int, default=0, help="seeds the networks and the attacks")
    opt("device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    opt("root", default=None, help="data root (default: the one recorded in the export)")
    opt("data-path", default=None, help="array/ImageFolder data file or folder (default: the recorded one)")
    opt(
        "output",
        default=None,
        help="JSON file (default: <PATH stem>_privacy.json beside PATH), the PNG beside it under the same name; an "
        "existing file is kept: the result goes to <name>-2.json, -3, ... unless --overwrite",
    )
    opt("overwrite", action="store_true", help="replace the --output file (or default name) if it exists")
    opt("no-progress", action="store_true", help="hide the progress bar")
    return p


def _protocol(text: str) -> Any:
    from lightning_distill.eval.protocols import Protocol, get_protocol

    if not text.lstrip().startswith("{"):
        get_protocol(text)  # an unknown name fails here, listing the known ones
        return text
    try:
        return Protocol(**json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--protocol: {text} is not a protocol mapping ({e})") from None


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ValueError(f"--{option} takes step counts >= 0, got {text!r}")
    return values


def parse_privacy_args(argv: Sequence[str]) -> dict[str, Any]:
    """``{"path", "output", "kwargs"}`` from a command line; ``kwargs`` are ``evaluate_privacy``'s arguments.

    Raises:
        ValueError: a malformed option (reported in one line by the command).
    """
    a = privacy_parser().parse_args(list(argv))
    arch_kwargs = None
    if a.arch_kwargs:
        try:
            arch_kwargs = json.loads(a.arch_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--arch-kwargs must be a JSON object, e.g. '{{\"width\": 32}}': {e}") from None
        if not isinstance(arch_kwargs, dict):
            raise ValueError(f"--arch-kwargs must be a JSON object, got {a.arch_kwargs!r}")
    attacks = [s.strip() for s in a.attacks.split(",") if s.strip()]
    unknown = [s for s in attacks if s not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"--attacks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ATTACKS)}")
    if a.arch is not None:
        from lightning_distill.nets import list_nets

        if a.arch not in list_nets():
            raise ValueError(f"--arch: unknown network {a.arch!r}; choose from {', '.join(list_nets())}")
    if not 0 < a.test_fraction < 1:
        raise ValueError(f"--test-fraction must lie in (0, 1), got {a.test_fraction}")
    kwargs = {
        "protocol": _protocol(a.protocol),
        "steps": _int_list(a.steps, "steps"),
        "baseline": not a.no_baseline,
        "arch": a.arch,
        "arch_kwargs": arch_kwargs,
        "constant_lr": not a.keep_schedule,
        "attacks": attacks,
        "test_fraction": a.test_fraction,
        "seed": a.seed,
        "root": a.root,
        "data_path": a.data_path,
        "device": a.device,
        "progress": not a.no_progress,
        "nonmembers": a.nonmembers,
    }
    path = Path(a.path)
    output = Path(a.output) if a.output else path.with_name(f"{path.stem}_privacy.json")
    return {"path": path, "output": output, "overwrite": a.overwrite, "kwargs": kwargs}


def format_privacy_table(results: Sequence[PrivacyResult]) -> str:
    """A markdown table: one row per set and step count, test accuracy, every attack's AUC and the best one."""
    attacks = list(results[0].points[0].auc) if results and results[0].points else list(ATTACKS)
    lines = [
        f"| set | steps | test acc (%) | {' | '.join(attacks)} | best AUC |",
        "|---|---|---|" + "---|" * len(attacks) + "---|",
    ]
    for r in results:
        for p in r.points:
            cells = " | ".join(f"{p.auc[a]:.3f}" for a in attacks)
            lines.append(f"| {r.name} | {p.steps} | {p.accuracy:.2f} | {cells} | {p.best_auc:.3f} |")
    return "\n".join(lines)


def privacy_figure(results: Sequence[PrivacyResult], title: str = "") -> Any:
    """The figure of FRePo's paper: best-attack AUC (left) and test accuracy (right) against training steps.

    Returns a matplotlib ``Figure`` on an Agg canvas (pyplot's global state and the user's backend stay untouched).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax_auc, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in results:
        color, marker = _STYLE.get(r.name, (None, "^"))
        steps = [p.steps for p in r.points]
        label = f"{r.name} ({r.num_images} images)"
        ax_auc.plot(steps, [p.best_auc for p in r.points], marker=marker, color=color, label=f"{label}, best attack")
        for attack in r.points[0].auc if r.points else ():
            # Each attack faintly, so the best line's spread is visible.
            ax_auc.plot(steps, [p.auc[attack] for p in r.points], color=color, alpha=0.25, linewidth=0.8)
        ax_acc.plot(steps, [p.accuracy for p in r.points], marker=marker, color=color, label=label)
    ax_auc.axhline(0.5, color="k", linestyle=":", linewidth=0.8)
    ax_auc.set_ylabel("membership-inference AUC")
    ax_acc.set_ylabel("test accuracy (%)")
    steps = sorted({p.steps for r in results for p in r.points})
    for ax in (ax_auc, ax_acc):
        # Log steps as FRePo draws them; linear below the first positive count, so an untrained point (0) shows.
        positive = [s for s in steps if s > 0]
        if steps and steps[0] == 0:
            ax.set_xscale("symlog", linthresh=positive[0] if positive else 1)
            ax.set_xlim(left=0)  # symlog would otherwise show an empty negative decade
        else:
            ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (a crash leaves the previous picture, never half of one)."""
    from lightning_distill.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def privacy_record(results: Sequence[PrivacyResult]) -> dict[str, Any]:
    """The JSON written for a run: the stamp (date, hardware, versions, commit) and every result."""
    from lightning_distill.provenance import stamp

    return {"stamp": stamp(), "results": [r.to_dict() for r in results]}


def figure_title(results: Sequence[PrivacyResult]) -> str:
    """``mnist · FRePo · ipc 10 · krr-constant-lr · convnet_frepo``, from what the results record."""
    if not results:
        return ""
    e = results[0].extra
    parts = [e.get("dataset"), e.get("method"), f"ipc {e['ipc']}" if "ipc" in e else None]
    return " · ".join(str(x) for x in (*parts, results[0].protocol, results[0].arch) if x)


def privacy_main(argv: Sequence[str]) -> list[PrivacyResult]:
    """``lightning-distill privacy``: print the table, write ``<stem>_privacy.json`` and ``<stem>_privacy.png``."""
    return run_privacy(parse_privacy_args(argv))


def run_privacy(args: dict[str, Any]) -> list[PrivacyResult]:
    """Evaluate, print the table, write the JSON and the figure beside it, for parsed :func:`parse_privacy_args`."""
    from lightning_distill.cli import write_new_json
    from lightning_distill.eval.privacy import evaluate_privacy

    results = evaluate_privacy(args["path"], **args["kwargs"])
    print(format_privacy_table(results))
    out = args["output"]
    # Like every evaluation, an existing result is kept (the new one goes to <name>-2.json) unless --overwrite.
    written = write_new_json(out, privacy_record(results), overwrite=args["overwrite"])
    png = save_figure(privacy_figure(results, figure_title(results)), written.with_suffix(".png"))
    kept = f" ({out} exists and was kept; --overwrite replaces it)" if written != out else ""
    print(f"wrote {written} and {png}{kept}")
    return results


def privacy_command(argv: list[str]) -> list[PrivacyResult]:
    """The registered command; a wrong input is reported by ``lightning-distill`` itself, in one line (exit 2)."""
    return privacy_main(argv)
