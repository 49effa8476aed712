"""Milliseconds per outer step, peak memory and FLOP rate of every method, beside the machine's own matmul rate.

    python benchmarks/speed.py [--steps 5] [--ipcs 1 10 50] [--device cuda] [--methods FRePo RandomSubset]

Every method exported by ``lightning_distill.methods`` (the base class aside) is timed at each IPC on 28 px grey and
32 px RGB inputs (10 classes, random pixels: speed does not depend on pixel values). One timed step is the work of
one ``training_step``: the synthetic set's forward, ``outer_loss``, backward, the synthetic optimiser step and
``after_outer_step`` (model pools, students). The same run measures the dense float32 matmul rate of the device
(``--matmul-size`` square matrices), and each method's FLOP rate is reported as a fraction of it; FLOPs are counted
over one extra step with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and
backward; linear solves and elementwise work are not counted, so the fraction is a lower bound for kernel methods).

Writes ``benchmarks/results/speed.{json,md}``, stamped with date, hardware, torch version and commit.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

import lightning_distill.methods as methods_pkg  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.methods import DistillationMethod  # noqa: E402
from lightning_distill.runtime import ENV_VAR, tune_cpu_allocator  # noqa: E402
from lightning_distill.synthetic import PixelSet  # noqa: E402

NUM_CLASSES = 10
SHAPES: dict[str, tuple[int, int, int]] = {"28px grey": (1, 28, 28), "32px RGB": (3, 32, 32)}
# official: the papers' settings; cpu: what the CPU recipes change; smoke: tiny, for tests of this script.
PROFILES = ("official", "cpu", "smoke")

# A constructor takes (ipc, profile) and returns the method (its synthetic set not yet built) and the real batch size.
Constructor = Callable[[int, str], tuple[DistillationMethod, int]]


def _frepo(ipc: int, profile: str) -> tuple[DistillationMethod, int]:
    """FRePo as in recipes/frepo/ (official: convnet_frepo 128/256/512, real batch 1024; cpu: width 64, batch 256)."""
    from lightning_distill.methods import FRePo

    width = {"official": {}, "cpu": {"width": 64}, "smoke": {"width": 8}}[profile]
    pool = {"official": 10, "cpu": 10, "smoke": 2}[profile]
    batch = {"official": 1024, "cpu": 256, "smoke": 64}[profile]
    return FRePo(synthetic=PixelSet(ipc=ipc, labels="learned"), arch_kwargs=width, pool_size=pool), batch


def _random_subset(ipc: int, profile: str) -> tuple[DistillationMethod, int]:
    """RandomSubset as in recipes/random/ (nothing learned: the step is the pipeline's fixed cost)."""
    from lightning_distill.methods import RandomSubset

    return RandomSubset(synthetic=PixelSet(ipc=ipc, labels="hard")), {"smoke": 64}.get(profile, 256)


# One line per method. A method missing here is still timed, built with its defaults around a PixelSet.
CONSTRUCTORS: dict[str, Constructor] = {"FRePo": _frepo, "RandomSubset": _random_subset}


def discover_methods() -> list[str]:
    """Every ``DistillationMethod`` subclass that ``lightning_distill.methods`` exports."""
    names = []
    for name in methods_pkg.__all__:
        obj = getattr(methods_pkg, name)
        if isinstance(obj, type) and issubclass(obj, DistillationMethod) and obj is not DistillationMethod:
            names.append(name)
    return names


def build(name: str, ipc: int, profile: str) -> tuple[DistillationMethod, int, str]:
    """The method, its real batch size, and how it was built."""
    if name in CONSTRUCTORS:
        method, batch = CONSTRUCTORS[name](ipc, profile)
        return method, batch, "speed.py table"
    cls = getattr(methods_pkg, name)
    return cls(synthetic=PixelSet(ipc=ipc)), 256, "defaults (no entry in speed.py's CONSTRUCTORS)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, n: int, min_seconds: float = 2.0) -> dict[str, Any]:
    """Dense float32 ``n × n`` matmul rate of ``device`` in GFLOP/s (2 n³ FLOPs per product)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    a @ b  # warm-up: library initialisation and kernel selection
    _sync(device)
    reps, batch, start = 0, 1, time.perf_counter()
    while True:
        # Batches of products between synchronisations, doubling, so a fast GPU is not timed on launch latency.
        for _ in range(batch):
            a @ b
        _sync(device)
        reps += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and reps >= 3:
            break
        batch = min(2 * batch, 64)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.startswith("cuda") else False
    return {"size": n, "dtype": "float32", "tf32": tf32, "reps": reps, "gflops": 2 * n**3 * reps / elapsed / 1e9}


def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory of one configuration, from before its method is built to the end of its timed steps.

    GPU: ``torch.cuda.max_memory_allocated`` growth (tensors only, not the allocator's cache). CPU: growth of the
    process's resident-set high-water mark (``VmHWM``), reset per configuration through ``/proc/self/clear_refs``;
    where that reset is unavailable, growth of ``getrusage``'s ``ru_maxrss``, which only shows a configuration that
    needs more than every earlier one (zero otherwise).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        if device.startswith("cuda"):
            self.how = "torch.cuda.max_memory_allocated growth (tensors, not the allocator cache)"
        elif self._reset_hwm():
            self.how = "CPU resident-set high-water mark growth (VmHWM, reset per configuration via clear_refs)"
        else:
            self.how = "CPU ru_maxrss growth (process-lifetime high-water mark: 0 unless above earlier peaks)"
        self.base = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        """Begin a configuration."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif "VmHWM" in self.how and self._reset_hwm():
            self.base = _proc_status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

    def peak_mb(self) -> float:
        """Peak growth since :meth:`start`, in MiB."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif "VmHWM" in self.how:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.base, 0) / 2**20


def measure(
    name: str, shape: tuple[int, int, int], ipc: int, steps: int, device: str, profile: str, memory: PeakMemory
) -> dict[str, Any]:
    """Time ``steps`` outer steps (after one warm-up), read the peak memory, then count one step's FLOPs."""
    memory.start()
    method, batch, built = build(name, ipc, profile)
    gen = torch.Generator().manual_seed(0)
    n = max(batch, NUM_CLASSES * ipc)  # at least ipc images of every class to initialise the set from
    x_real = torch.randn(n, *shape, generator=gen)
    y_real = torch.arange(n) % NUM_CLASSES
    method.synthetic.build(NUM_CLASSES, shape)
    method.to(device)
    method.synthetic.initialise(x_real, y_real, gen)
    x_real, y_real = x_real[:batch].to(device), y_real[:batch].to(device)
    # setup_method reads shapes from the set; a stand-in DataModule carries what a real one would offer.
    method.setup_method(SimpleNamespace(num_classes=NUM_CLASSES, image_shape=shape, x_train=x_real, y_train=y_real))
    groups = method.optimizer_groups()
    opt = method.syn_optimizer(groups) if method.syn_optimizer is not None else method.default_optimizer(groups)
    named = method.named_meta_parameters()

    def step() -> None:
        # The work of DistillationMethod.training_step, without the Trainer around it.
        opt.zero_grad(set_to_none=True)
        x_syn, y_syn = method.synthetic() if method.materialise_set else (None, None)
        out = method.outer_loss(x_syn, y_syn, x_real, y_real)
        if out is not None and out.loss is not None:
            out.loss.backward()
        elif out is not None:  # a method that hands back its gradients (MetaStep.grads)
            for n, g in out.grads.items():
                named[n].grad = g
        if out is not None:
            method.before_meta_update({n: p for n, p in named.items() if p.grad is not None})
        opt.step()
        method.after_outer_step(x_real, y_real)

    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t))
    peak = memory.peak_mb()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    median = statistics.median(times[1:])
    return {
        "method": name,
        "input": next(k for k, v in SHAPES.items() if v == shape),
        "ipc": ipc,
        "real_batch": batch,
        "built_with": built,
        "median_ms": median,
        "all_ms": times[1:],
        "peak_mb": peak,
        "flops_per_step": flops,
        "gflops": flops / (median / 1000) / 1e9,
    }


def markdown(res: dict[str, Any]) -> str:
    """The speed table."""
    s, mm = res["stamp"], res["matmul"]
    lines = [
        "## Milliseconds per outer step, peak memory and FLOP rate",
        "",
        f"{s['date']}, {s['hardware']}, device {res['device']}, torch {s['torch']}, commit {s['commit']}. "
        f"Profile `{res['profile']}`; median of {res['steps']} steps after one warm-up. Dense matmul rate of the "
        f"same run: **{mm['gflops']:.1f} GFLOP/s** ({mm['dtype']} {mm['size']}×{mm['size']}, TF32 "
        f"{'on' if mm['tf32'] else 'off'}). Peak memory: {res['memory']}. FLOPs: {res['flop_counting']}.",
        "",
        "| method | input | IPC | real batch | allocator | ms/step | peak memory (MiB) | GFLOP/step | GFLOP/s "
        "| of matmul rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    before: dict[tuple, float] = {}
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['input']} | {r['ipc']} | – | – | {r['error']} | | | | |")
            continue
        key = (r["method"], r["input"], r["ipc"])
        alloc = r.get("allocator", "–")
        if alloc == "default":
            before[key] = r["median_ms"]
        elif alloc == "tuned" and key in before:  # the after of a before/after pair
            alloc += f" ({100 * (r['median_ms'] / before[key] - 1):+.0f} %)"
        lines.append(
            f"| {r['method']} | {r['input']} | {r['ipc']} | {r['real_batch']} | {alloc} | {r['median_ms']:.1f} "
            f"| {r['peak_mb']:.0f} | {r['flops_per_step'] / 1e9:.2f} | {r['gflops']:.1f} "
            f"| {100 * r['matmul_fraction']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (method, input, IPC) configuration; write speed.json and speed.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method in lightning_distill.methods")
    p.add_argument("--profile", choices=PROFILES, default=None, help="default: official on GPU, cpu on CPU")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmul that sets the peak")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--allocator",
        choices=("tuned", "default", "both"),
        default=None,
        help="glibc malloc as lightning-distill sets it (tuned), as glibc ships it (default), or each configuration "
        "under both in turn (the before/after of lightning_distill.runtime.tune_cpu_allocator); by default as the "
        "lightning-distill command runs: tuned where glibc allows, else the platform's allocator",
    )
    p.add_argument("--name", default="speed", help="output stem: OUT/NAME.json and OUT/NAME.md")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tunable = tune_cpu_allocator(True)
    if a.allocator is None:  # what a user's run gets
        a.allocator = "tuned" if tunable or a.device != "cpu" else "default"
        if a.allocator == "default":
            print(f"[speed] glibc's mallopt unavailable (or {ENV_VAR}=0): measuring the default allocator", flush=True)
    allocators = ["default", "tuned"] if a.allocator == "both" else [a.allocator]
    if a.device == "cpu" and not tunable and "tuned" in allocators:
        p.error(f"--allocator {a.allocator} needs glibc's mallopt (and {ENV_VAR} not set to 0)")
    known = discover_methods()
    chosen = a.methods or known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(known)}")
    profile = a.profile or ("official" if a.device.startswith("cuda") else "cpu")

    mm = matmul_rate(a.device, a.matmul_size)
    print(f"dense float32 matmul {a.matmul_size}²: {mm['gflops']:.1f} GFLOP/s", flush=True)
    memory = PeakMemory(a.device)
    rows = []
    for name in chosen:
        for shape in SHAPES.values():
            for ipc in a.ipcs:
                for alloc in allocators:
                    if a.device == "cpu":
                        tune_cpu_allocator(alloc == "tuned")
                    try:
                        r = measure(name, shape, ipc, a.steps, a.device, profile, memory)
                    except (RuntimeError, ValueError) as e:  # out of memory, a method that cannot run this shape
                        label = next(k for k, v in SHAPES.items() if v == shape)
                        r = {"method": name, "input": label, "ipc": ipc, "error": f"{type(e).__name__}: {e}"[:200]}
                        print(f"{name:14s} {label:10s} IPC {ipc:3d}: {r['error']}", flush=True)
                        rows.append(r)
                        continue
                    r["allocator"] = alloc if a.device == "cpu" else "cuda caching"
                    r["matmul_fraction"] = r["gflops"] / mm["gflops"]
                    rows.append(r)
                    print(
                        f"{name:14s} {r['input']:10s} IPC {ipc:3d} {r['allocator']:8s}: {r['median_ms']:9.1f} "
                        f"ms/step, {r['peak_mb']:7.0f} MiB, {r['gflops']:8.2f} GFLOP/s "
                        f"({100 * r['matmul_fraction']:.1f} %)",
                        flush=True,
                    )
    res = {
        "stamp": stamp(),
        "device": a.device,
        "profile": profile,
        "steps": a.steps,
        "matmul": mm,
        "memory": memory.how,
        "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one step (matmul/conv, forward and backward)",
        "rows": rows,
    }
    out = Path(a.out)
    with atomic_path(out / f"{a.name}.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    with atomic_path(out / f"{a.name}.md") as tmp:
        tmp.write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
