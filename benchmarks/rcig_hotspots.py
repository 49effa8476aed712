"""RCIG's two CPU hot-spot fixes, before and after, measured side by side in one run.

    python benchmarks/rcig_hotspots.py --ipcs 1 10 --steps 4 --width 32 --batch 256

Four variants of the same RCIG step (the CPU recipe's network and real batch, fixed solver rates, 20 + 20 solver
steps) are built on the same data and their steps interleaved (A, B, C, D, A, ...), so that a noisy neighbour slows
all alike:

* ``before``: denormals not flushed, every solver product a JVP and a backward pass through the network;
* ``+ftz``: denormals flushed around the step (softplus(60x)/60 makes denormals by the million);
* ``+jacobian``: the support set's Jacobian formed once per step, each solver product a matmul;
* ``after``: both (what the CPU recipes run).

Each row gives the median ms per step and the method's own phase timings (inner solve, direct pass, inverse-HVP,
implicit term, pool). Writes ``benchmarks/results/rcig_hotspots.{json,md}``, stamped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp, write_result  # noqa: E402

from lightning_distill.methods import RCIG  # noqa: E402
from lightning_distill.runtime import flush_denormals, tune_cpu_allocator  # noqa: E402
from lightning_distill.synthetic import PixelSet  # noqa: E402

VARIANTS = {"before": (False, 0.0), "+ftz": (True, 0.0), "+jacobian": (False, 1024.0), "after": (True, 1024.0)}


class Variant:
    def __init__(self, ipc: int, width: int, batch: int, shape: tuple[int, int, int], ftz: bool, jac: float):
        gen = torch.Generator().manual_seed(0)
        n = max(batch, 10 * ipc)
        x = torch.randn(n, *shape, generator=gen)
        y = torch.arange(n) % 10
        self.method = RCIG(
            synthetic=PixelSet(ipc=ipc, labels="learned"),
            arch_kwargs={"width": width},
            tune_lr=False,
            inner_lr=1e-3,
            hinv_lr=5.0,
            jacobian_mb=jac,
        )
        self.method.synthetic.build(10, shape)
        self.method.synthetic.initialise(x, y, gen)
        self.method.setup_method(SimpleNamespace())
        self.opt = self.method.default_optimizer(self.method.optimizer_groups())
        self.named = self.method.named_meta_parameters()
        self.x_real, self.y_real = x[:batch], y[:batch]
        self.ftz = ftz
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []

    def step(self) -> None:
        t = time.perf_counter()
        with flush_denormals(self.ftz):
            self.opt.zero_grad(set_to_none=True)
            x_syn, y_syn = self.method.synthetic()
            out = self.method.outer_loss(x_syn, y_syn, self.x_real, self.y_real)
            for n, g in out.grads.items():
                self.named[n].grad = g
            self.opt.step()
            self.method.after_outer_step(self.x_real, self.y_real)
        self.times.append(1000 * (time.perf_counter() - t))
        self.phases.append({k: 1000 * v for k, v in self.method.timings.items()})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="rcig_hotspots")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_cpu_allocator()
    rows = []
    for ipc in a.ipcs:
        variants = {name: Variant(ipc, a.width, a.batch, (1, 28, 28), *opts) for name, opts in VARIANTS.items()}
        for v in variants.values():
            v.step()  # warm-up
            v.times.clear()
            v.phases.clear()
        for _ in range(a.steps):
            for v in variants.values():
                v.step()
        base = variants["before"].times
        for name, v in variants.items():
            med = statistics.median(v.times)
            rows.append(
                {
                    "ipc": ipc,
                    "variant": name,
                    "median_ms": med,
                    "all_ms": v.times,
                    "speedup_vs_before": statistics.median(b / t for b, t in zip(base, v.times, strict=True)),
                    "phases_ms": {k: statistics.median(ph[k] for ph in v.phases) for k in v.phases[0]},
                }
            )
            print(f"IPC {ipc:3d} {name:10s} {med:9.0f} ms/step  {rows[-1]['speedup_vs_before']:.2f}x", flush=True)
    res = {"stamp": stamp(), "threads": a.threads, "width": a.width, "real_batch": a.batch, "steps": a.steps}
    res["rows"] = rows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_result(out / f"{a.name}.json", json.dumps(res, indent=2))
    write_result(out / f"{a.name}.md", markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    s = res["stamp"]
    names = list(res["rows"][0]["phases_ms"])
    lines = [
        "## RCIG hot spots on the CPU: before and after",
        "",
        f"{s['date']}, {s['hardware']}, {res['threads']} torch thread(s), torch {s['torch']}, commit {s['commit']}. "
        f"MNIST-shaped input (28 px grey), pool network convnet_rcig at width {res['width']} (softplus β=60), real "
        f"batch {res['real_batch']}, 20 + 20 solver steps; median of {res['steps']} interleaved steps per variant "
        "after one warm-up; *vs before* is the median ratio of paired steps.",
        "",
        "| IPC | variant | ms/step | vs before | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in res["rows"]:
        cells = " | ".join(f"{r['phases_ms'][k]:.0f}" for k in names)
        lines.append(
            f"| {r['ipc']} | {r['variant']} | {r['median_ms']:.0f} | {r['speedup_vs_before']:.2f}x | {cells} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
