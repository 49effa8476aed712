"""The model pool's online Adam: single-tensor path against the fused kernel, in FRePo's and RCIG's whole step.

    python benchmarks/pool_adam.py --device cuda --ipcs 1 10 50 --profile official --steps 20 \
        --out benchmarks/results/pool_adam_h100
    python benchmarks/pool_adam.py --device cpu --ipcs 1 10 --profile cpu --threads 1 --steps 5

A GPU step of FRePo is bound by operator dispatch, not arithmetic (``results/speed_methods_precision_h100.partial.md``:
1411 operator calls per step, about half of them in the pool member's online update), and the single-tensor Adam
issues about ten calls per parameter tensor where the fused kernel issues one or two for all of them. Since this
script's commit the pool runs fused Adam by default where it computes on CUDA (``ModelPool(fused=None)``) and keeps
the single-tensor path, bit for bit the earlier update, on the CPU.

Per method and IPC, two copies are built with speed.py's configuration (``--profile``), one with ``pool.fused =
False`` and one with ``True``; after a warm-up step each, their whole outer steps alternate (single, fused, single,
...) and the median ratio of the paired steps is reported, with each one's ``aten::`` operator calls per step
(``torch.profiler`` over one more step). The fused path's numerical agreement is a unit test
(``tests/test_model_pool.py``), not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from stamp import finish_at, page_head, started  # noqa: E402

METHODS = ("FRePo", "RCIG")  # the methods with a model pool


def operator_calls(cfg: speed.Configuration) -> int:
    """``aten::`` operator calls of one more step of ``cfg`` (the dispatches a GPU step pays for)."""
    return sum(e.count for e in cfg.step_events() if e.key.startswith("aten::"))


def compare(name: str, ipc: int, steps: int, device: str, profile: str, precision: str) -> dict[str, Any]:
    """Whole steps of ``name`` with the pool's single-tensor and fused Adam, interleaved; one row."""
    configs = {}
    for fused in (False, True):
        cfg = speed.Configuration(name, speed.SHAPES["28px grey"], ipc, device, profile, precision)
        cfg.method.pool.fused = fused
        cfg.timed_step()  # warm-up
        configs[fused] = cfg
    speed.alternate(list(configs.values()), steps)
    single, fused = configs[False], configs[True]
    row = {
        "method": name,
        "ipc": ipc,
        "profile": profile,
        "precision": precision,
        "precision_resolved": single.method.network_precision.dtype,
        "real_batch": single.batch,
        "single_ms": round(statistics.median(single.times), 2),
        "fused_ms": round(statistics.median(fused.times), 2),
        "speedup": round(speed.paired_speedup(single, fused), 3),
        "single_calls": operator_calls(single),
        "fused_calls": operator_calls(fused),
    }
    print(
        f"{name} IPC {ipc} {precision}→{row['precision_resolved']} ({profile}, {device}): single-tensor "
        f"{row['single_ms']} ms ({row['single_calls']} calls), fused {row['fused_ms']} ms ({row['fused_calls']} "
        f"calls), {row['speedup']:.2f}x paired",
        flush=True,
    )
    return row


def markdown(res: dict[str, Any]) -> str:
    title = "The pool's online Adam: single-tensor path against the fused kernel"
    lines = [
        *page_head(title, res, "pool_adam.py", f"; device `{res['device']}`"),
        f"Whole outer steps (speed.py's configuration, 28 px grey), median of {res['steps']} per variant after a "
        "warm-up, the two variants alternating; *speed-up* is the median ratio of paired steps (single / fused); "
        "*calls*: `aten::` operators dispatched in one more step.",
        "",
        *([f"Note: {res['note']}", ""] if res.get("note") else []),
        "| method | IPC | profile | precision | real batch | single-tensor ms | fused ms | speed-up | calls "
        "(single → fused) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        prec = (
            r["precision"]
            if r["precision"] == r["precision_resolved"]
            else f"{r['precision']} → {r['precision_resolved']}"
        )
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['profile']} | {prec} | {r['real_batch']} | {r['single_ms']} | "
            f"{r['fused_ms']} | {r['speedup']:.2f}x | {r['single_calls']} → {r['fused_calls']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=speed.PROFILES, default=None, help="default: official on GPU, cpu on CPU")
    parser.add_argument("--precision", default="auto", help="the methods' precision argument (fp32, bf16, auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--note", default="", help="a remark recorded with the results")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (old ones: replaced/)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = args.profile or ("official" if args.device.startswith("cuda") else "cpu")
    rows = [
        compare(name, ipc, args.steps, args.device, profile, args.precision)
        for name in args.methods
        for ipc in args.ipcs
    ]
    res = {
        **started(argv),
        "device": args.device,
        "steps": args.steps,
        "rows": rows,
        "note": args.note,
    }
    finish_at(args.out, res, markdown)
    return res


if __name__ == "__main__":
    main()
