"""Milliseconds per outer step, peak memory and FLOP rate of every method, beside the machine's own matmul rate.

    python benchmarks/speed.py [--steps 5] [--ipcs 1 10 50] [--device cuda] [--methods FRePo RandomSubset]
    python benchmarks/speed.py --precision fp32,policy --methods FRePo --ipcs 1 10 --inputs "28px grey" \
        --profile official --profile-top 12 --name speed_precision

Every method exported by ``lightning_distill.methods`` (the base class aside) is timed at each IPC on 28 px grey and
32 px RGB inputs (10 classes, random pixels: speed does not depend on pixel values). One timed step is the work of
one ``training_step``: the synthetic set's forward, ``outer_loss``, backward, the synthetic optimiser step and
``after_outer_step`` (model pools, students). The same run measures the dense float32 matmul rate of the device
(``--matmul-size`` square matrices), and each method's FLOP rate is reported as a fraction of it; FLOPs are counted
over one extra step with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and
backward; linear solves and elementwise work are not counted, so the fraction is a lower bound for kernel methods).

``--precision fp32,policy`` times each configuration under float32 and under the precision policy (``auto``:
bf16 autocast + channels-last network passes where the device has fast bf16, see ``lightning_distill.precision``)
side by side: both methods are built, then their steps alternate (fp32, policy, fp32, ...) so that a noisy
neighbour slows both alike, and the median ratio is reported. The run then also measures the bf16 matmul rate,
alternating with the float32 one, and each row's FLOP rate is a fraction of the rate of the precision it resolved
to. ``--profile-top N`` profiles one more step of each row with ``torch.profiler`` and keeps its N largest
operators by self CPU time.

Writes ``benchmarks/results/speed.{json,md}``, stamped with date, hardware, torch version and commit.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import inspect
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
from stamp import stamp, write_result  # noqa: E402

import lightning_distill.methods as methods_pkg  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.methods import DistillationMethod  # noqa: E402
from lightning_distill.precision import PrecisionPolicy, bf16_probe  # noqa: E402
from lightning_distill.runtime import ENV_VAR, flush_denormals, tune_cpu_allocator  # noqa: E402
from lightning_distill.synthetic import PixelSet  # noqa: E402

NUM_CLASSES = 10
SHAPES: dict[str, tuple[int, int, int]] = {"28px grey": (1, 28, 28), "32px RGB": (3, 32, 32)}
# official: the papers' settings; cpu: what the CPU recipes change; smoke: tiny, for tests of this script.
PROFILES = ("official", "cpu", "smoke")

#: ``--precision`` names: ``policy`` is what a method given ``precision="auto"`` runs (the policy's own choice).
PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16", "auto": "auto", "policy": "auto"}

# A constructor takes (ipc, profile, precision) and returns the method (its synthetic set not yet built) and the
# real batch size.
Constructor = Callable[[int, str, str], tuple[DistillationMethod, int]]


def _memories_bptt(ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int]:
    """MemoriesBPTT on AddressableMemories as in recipes/memories/ (official: width 128, T=150, 32 addresses per class,
    K=16 at half resolution, real batch 640; cpu: width 16, T=10, 10 per class, batch 256)."""
    from lightning_distill.methods import MemoriesBPTT
    from lightning_distill.synthetic import AddressableMemories

    width, steps, per_class = {"official": (128, 150, 32), "cpu": (16, 10, 10), "smoke": (8, 2, 2)}[profile]
    method = MemoriesBPTT(
        synthetic=AddressableMemories(ipc=ipc, num_bases=16, downsample=2),
        arch_kwargs={"width": width},
        inner_steps=steps,
        inner_lr=0.01 if profile == "official" else 0.05,
        per_class_batch=per_class,
        precision=precision,
    )
    return method, {"official": 640, "cpu": 256, "smoke": 64}[profile]


def _frepo(ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int]:
    """FRePo as in recipes/frepo/ (official: convnet_frepo 128/256/512, real batch 1024; cpu: width 64, batch 256)."""
    from lightning_distill.methods import FRePo

    width = {"official": {}, "cpu": {"width": 64}, "smoke": {"width": 8}}[profile]
    pool = {"official": 10, "cpu": 10, "smoke": 2}[profile]
    batch = {"official": 1024, "cpu": 256, "smoke": 64}[profile]
    method = FRePo(
        synthetic=PixelSet(ipc=ipc, labels="learned"), arch_kwargs=width, pool_size=pool, precision=precision
    )
    return method, batch


def _random_subset(ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int]:
    """RandomSubset as in recipes/random/ (nothing learned: the step is the pipeline's fixed cost; no network)."""
    from lightning_distill.methods import RandomSubset

    return RandomSubset(synthetic=PixelSet(ipc=ipc, labels="hard")), {"smoke": 64}.get(profile, 256)


def _apm(ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int]:
    """APM as in recipes/apm/ (official: width 128, students of 250 epochs; cpu: width 32, 50 epochs), with untrained
    teachers (time does not depend on their weights). A student is retrained every third step, as in a run: the
    median step is an image update, the mean includes the retrains."""
    from lightning_distill.components.teachers import TeacherPool, TeacherSpec
    from lightning_distill.methods import APM

    width = {"official": {}, "cpu": {"width": 32}, "smoke": {"width": 8}}[profile]
    epochs, k = {"official": (250, 5), "cpu": (50, 5), "smoke": (2, 1)}[profile]
    spec = TeacherSpec(arch_kwargs=width, num_teachers=2)
    method = APM(
        synthetic=PixelSet(ipc=ipc),
        arch_kwargs=width,
        teachers=spec,
        student_epochs=epochs,
        num_checkpoints=k,
        precision=precision,
    )
    original = method.setup_method

    def setup_with_untrained_teachers(datamodule: Any) -> None:
        c, h, _ = method.synthetic.image_shape
        method.pool = TeacherPool.untrained(spec, c, method.synthetic.num_classes, h)
        original(datamodule)

    method.setup_method = setup_with_untrained_teachers  # type: ignore[method-assign]
    return method, {"smoke": 64}.get(profile, 256)


def _rcig(ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int]:
    """RCIG as in recipes/rcig/ (official: convnet_rcig 128/256/512, pool 30, 20 + 20 solver steps, real batch 1024;
    cpu: width 32, real batch 256). The solver rates are fixed at typical tuned values (the one-off tuning before the
    first step is not part of a step); ``timings`` gives the breakdown (inner, direct, hinv, implicit, pool)."""
    from lightning_distill.methods import RCIG

    width = {"official": {}, "cpu": {"width": 32}, "smoke": {"width": 8, "depth": 2}}[profile]
    pool, steps = {"official": (30, 20), "cpu": (30, 20), "smoke": (2, 3)}[profile]
    method = RCIG(
        synthetic=PixelSet(ipc=ipc, labels="learned"),
        arch_kwargs=width,
        pool_size=pool,
        inner_steps=steps,
        hinv_steps=steps,
        tune_lr=False,
        inner_lr=1e-3,
        hinv_lr=5.0,
        precision=precision,
    )
    return method, {"official": 1024, "cpu": 256, "smoke": 64}[profile]


def _apm_image_update_next(method: DistillationMethod) -> None:
    """Make APM's next step an image update: its FLOPs are compared with the median step, which is one (a retrain's
    hundreds of student epochs counted over an image update's time put a row at 1042 % of the H100's fp32 rate)."""
    period = method.mid_gap + 1  # type: ignore[attr-defined]
    if method._calls % period == 0:  # type: ignore[attr-defined]  # without a Trainer, APM counts its own calls
        method._calls += 1  # type: ignore[attr-defined]


#: Methods whose steps are not all alike: called before the FLOP-counted step to make it the kind the median is.
BEFORE_FLOP_STEP: dict[str, Callable[[DistillationMethod], None]] = {"APM": _apm_image_update_next}

# One line per method. A method missing here is still timed, built with its defaults around a PixelSet.
CONSTRUCTORS: dict[str, Constructor] = {
    "FRePo": _frepo,
    "RandomSubset": _random_subset,
    "APM": _apm,
    "MemoriesBPTT": _memories_bptt,
    "RCIG": _rcig,
}


def discover_methods() -> list[str]:
    """Every ``DistillationMethod`` subclass that ``lightning_distill.methods`` exports."""
    names = []
    for name in methods_pkg.__all__:
        obj = getattr(methods_pkg, name)
        if isinstance(obj, type) and issubclass(obj, DistillationMethod) and obj is not DistillationMethod:
            names.append(name)
    return names


def takes_precision(name: str) -> bool:
    """Whether the method's constructor accepts ``precision`` (a method without network passes need not)."""
    return "precision" in inspect.signature(getattr(methods_pkg, name).__init__).parameters


def build(name: str, ipc: int, profile: str, precision: str = "fp32") -> tuple[DistillationMethod, int, str]:
    """The method, its real batch size, and how it was built (``precision``: a mode of PrecisionPolicy)."""
    if name in CONSTRUCTORS:
        method, batch = CONSTRUCTORS[name](ipc, profile, precision)
        return method, batch, "speed.py table"
    cls = getattr(methods_pkg, name)
    kwargs = {"precision": precision} if takes_precision(name) else {}
    return cls(synthetic=PixelSet(ipc=ipc), **kwargs), 256, "defaults (no entry in speed.py's CONSTRUCTORS)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rates(device: str, n: int, dtypes: tuple[str, ...] = ("float32",), min_seconds: float = 2.0) -> list[dict]:
    """Dense ``n × n`` matmul rates of ``device`` in GFLOP/s (2 n³ FLOPs per product), one dict per dtype.

    Several dtypes are timed in alternation, a batch of products each in turn, so that both see the same load.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    pairs = {d: (a.to(getattr(torch, d)), b.to(getattr(torch, d))) for d in dtypes}
    for x, y in pairs.values():
        x @ y  # warm-up: library initialisation and kernel selection
    _sync(device)
    reps, elapsed, batch = dict.fromkeys(dtypes, 0), dict.fromkeys(dtypes, 0.0), dict.fromkeys(dtypes, 1)
    while not all(elapsed[d] >= min_seconds and reps[d] >= 3 for d in dtypes):
        for d, (x, y) in pairs.items():
            start = time.perf_counter()
            # Batches of products between synchronisations, doubling, so a fast GPU is not timed on launch latency.
            for _ in range(batch[d]):
                x @ y
            _sync(device)
            elapsed[d] += time.perf_counter() - start
            reps[d] += batch[d]
            if elapsed[d] < min_seconds / 4:
                batch[d] = min(2 * batch[d], 64)
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.startswith("cuda") else False
    return [
        {
            "size": n,
            "dtype": d,
            "tf32": tf32 and d == "float32",
            "reps": reps[d],
            "gflops": 2 * n**3 * reps[d] / elapsed[d] / 1e9,
        }
        for d in dtypes
    ]


#: The largest matmul timed in bf16 on a device without fast bf16: emulated there (an AMD EPYC with AVX2 ran bf16
#: products at 0.7-0.9 GFLOP/s), one 4096² product takes minutes, and the rate is the same at this size.
EMULATED_BF16_MATMUL_SIZE = 512


def matmul_size(device: str, asked: int, dtypes: tuple[str, ...]) -> int:
    """The side of the rate's matmuls: ``asked``, but at most :data:`EMULATED_BF16_MATMUL_SIZE` when bf16 is timed
    on a device the precision policy finds without fast bf16 (it says so)."""
    if "bfloat16" not in dtypes or asked <= EMULATED_BF16_MATMUL_SIZE:
        return asked
    probe = bf16_probe(device)
    if probe.instructions:
        return asked
    print(
        f"[speed] {probe.reason()}: bf16 is emulated there, so the matmul rates are measured at "
        f"{EMULATED_BF16_MATMUL_SIZE}² instead of {asked}² (one {asked}² bf16 product would take minutes)",
        flush=True,
    )
    return EMULATED_BF16_MATMUL_SIZE


def matmul_rate(device: str, n: int, min_seconds: float = 2.0) -> dict[str, Any]:
    """Dense float32 ``n × n`` matmul rate of ``device`` in GFLOP/s (2 n³ FLOPs per product)."""
    return matmul_rates(device, n, ("float32",), min_seconds)[0]


def _malloc_trim() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``; nothing elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


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
            # Freed memory the tuned allocator keeps would otherwise serve this configuration without any growth
            # of the resident set (an earlier, larger one hid the later ones' peaks): hand it back first.
            _malloc_trim()
            self._reset_hwm()
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


class Configuration:
    """One method built for one (input, IPC, precision), with the work of one ``training_step`` as :meth:`step`."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, int, int],
        ipc: int,
        device: str,
        profile: str,
        precision: str,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int | None = None,
    ):
        """``data``: real images and labels to initialise the set from and to draw the real batch from (their first
        ``batch``); ``None``: random pixels, classes in turn (speed does not depend on pixel values). ``seed``: the
        method's seed (its networks, pools and draws; the initial set does not depend on it); ``None``: its default."""
        method, batch, built = build(name, ipc, profile, precision)
        if seed is not None:
            method.seed = seed
            method.generator.manual_seed(seed)
        gen = torch.Generator().manual_seed(0)
        n = max(batch, NUM_CLASSES * ipc)  # at least ipc images of every class to initialise the set from
        if data is None:
            x_real = torch.randn(n, *shape, generator=gen)
            y_real = torch.arange(n) % NUM_CLASSES
        else:
            x_real, y_real = data
        method.synthetic.build(NUM_CLASSES, shape)
        method.to(device)
        method.synthetic.initialise(x_real, y_real, gen)
        self.x_real, self.y_real = x_real[:batch].to(device), y_real[:batch].to(device)
        # setup_method reads shapes from the set; a stand-in DataModule carries what a real one would offer.
        method.setup_method(
            SimpleNamespace(num_classes=NUM_CLASSES, image_shape=shape, x_train=self.x_real, y_train=self.y_real)
        )
        groups = method.optimizer_groups()
        factory = method.syn_optimizer
        self.opt = factory(groups) if factory is not None else method.default_optimizer(groups)
        self.method, self.batch, self.built, self.device = method, batch, built, device
        self.named = method.named_meta_parameters()
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.row: dict[str, Any] = {
            "method": name,
            "input": next(k for k, v in SHAPES.items() if v == shape),
            "ipc": ipc,
            "real_batch": batch,
            "built_with": built,
            # A method without the argument runs its passes (if any) as it always has: float32.
            "precision": precision if takes_precision(name) else "fp32",
            "precision_resolved": method.network_precision.dtype,
        }

    def step(self) -> None:
        """The work of DistillationMethod.training_step, without the Trainer around it."""
        method, opt, named = self.method, self.opt, self.named
        opt.zero_grad(set_to_none=True)
        x_syn, y_syn = method.synthetic() if method.materialise_set else (None, None)
        out = method.outer_loss(x_syn, y_syn, self.x_real, self.y_real)
        if out is not None and out.loss is not None:
            out.loss.backward()
        elif out is not None:  # a method that hands back its gradients (MetaStep.grads)
            for n, g in out.grads.items():
                named[n].grad = g
        if out is not None:
            method.before_meta_update({n: p for n, p in named.items() if p.grad is not None})
        opt.step()
        method.after_outer_step(self.x_real, self.y_real)

    def timed_step(self) -> float:
        """Milliseconds of one :meth:`step`, synchronised on both sides (and the method's own phase timings, if any)."""
        _sync(self.device)
        t = time.perf_counter()
        with flush_denormals(getattr(self.method, "flushes_denormals", False)):
            self.step()
        _sync(self.device)
        phases = getattr(self.method, "timings", None)
        if isinstance(phases, dict) and phases:
            self.phases.append({k: 1000 * v for k, v in phases.items()})
        return 1000 * (time.perf_counter() - t)

    def flops(self) -> int | None:
        """matmul/conv FLOPs of one step (forward and backward); ``None`` where the counter cannot follow the step.

        FlopCounterMode tracks modules with autograd hooks, which fail on the dual tensors of forward-mode AD
        (RCIG's linearised passes run under ``torch.func.jvp``): such rows report no FLOP rate.
        """
        try:
            with FlopCounterMode(display=False) as counter:
                self.step()
        except (AttributeError, RuntimeError):
            return None
        return counter.get_total_flops()

    def step_events(self) -> Any:
        """``torch.profiler``'s per-operator totals of one more step (with device time where there is a device)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            self.step()
            _sync(self.device)
        return prof.key_averages()

    def profile(self, top: int) -> list[dict[str, Any]]:
        """The ``top`` operators of one step by self CPU time (``torch.profiler``; device time where there is one)."""
        events = self.step_events()
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1000,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
                "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1000,
            }
            for e in ranked
        ]


def alternate(configs: list[Configuration], steps: int) -> None:
    """Time ``steps`` steps of each configuration, interleaved (A, B, A, B, ...): a noisy neighbour slows all alike."""
    for _ in range(steps):
        for cfg in configs:
            cfg.times.append(cfg.timed_step())


def paired_speedup(base: Configuration, other: Configuration) -> float:
    """Median of ``base``'s step time over ``other``'s, pair by pair (steadier than the ratio of two medians)."""
    return statistics.median(a / b for a, b in zip(base.times, other.times, strict=True))


def measure_variants(
    name: str,
    shape: tuple[int, int, int],
    ipc: int,
    steps: int,
    device: str,
    profile: str,
    memory: PeakMemory,
    precisions: list[str],
    profile_top: int = 0,
) -> list[dict[str, Any]]:
    """Time one configuration under each precision, the steps interleaved (A, B, A, B, ...); one row per precision.

    Each variant is built and takes its warm-up step alone, so its peak memory (building and the warm-up step, the
    step that allocates the most) is its own; then the timed steps alternate between the variants. A method without
    a ``precision`` argument is timed once.
    """
    precisions = precisions if takes_precision(name) else precisions[:1]
    configs = []
    for prec in precisions:
        memory.start()
        cfg = Configuration(name, shape, ipc, device, profile, prec)
        cfg.timed_step()  # the first step warms up allocators and kernels
        if len(precisions) > 1:
            cfg.row["peak_mb"] = memory.peak_mb()
        configs.append(cfg)
    alternate(configs, steps)
    if len(precisions) == 1:  # alone, the peak covers the timed steps as well
        configs[0].row["peak_mb"] = memory.peak_mb()
    rows = []
    for cfg in configs:
        BEFORE_FLOP_STEP.get(name, lambda m: None)(cfg.method)
        flops = cfg.flops()
        median = statistics.median(cfg.times)
        row = {**cfg.row, "median_ms": median, "all_ms": cfg.times, "flops_per_step": flops}
        if cfg.phases:  # a method that times its own phases (RCIG: inner, direct, hinv, implicit, pool)
            timed = cfg.phases[1:] or cfg.phases  # the first entry is the warm-up step's
            row["phases_ms"] = {k: statistics.median(p[k] for p in timed if k in p) for k in timed[-1]}
        row["gflops"] = None if flops is None else flops / (median / 1000) / 1e9
        if profile_top:
            row["profile"] = cfg.profile(profile_top)
        rows.append(row)
    base = rows[0]
    for row, cfg in zip(rows[1:], configs[1:], strict=True):
        row["speedup_vs_first"] = paired_speedup(configs[0], cfg)
        row["compared_with"] = base["precision"]
    return rows


def measure(
    name: str, shape: tuple[int, int, int], ipc: int, steps: int, device: str, profile: str, memory: PeakMemory
) -> dict[str, Any]:
    """Time ``steps`` outer steps (after one warm-up), read the peak memory, then count one step's FLOPs."""
    return measure_variants(name, shape, ipc, steps, device, profile, memory, ["fp32"])[0]


def _rate_line(mm: dict[str, Any]) -> str:
    tf32 = "on" if mm["tf32"] else "off"
    return f"**{mm['gflops']:.1f} GFLOP/s** ({mm['dtype']} {mm['size']}×{mm['size']}, TF32 {tf32})"


def markdown(res: dict[str, Any]) -> str:
    """The speed table (with a precision comparison and profiles when the run has them)."""
    s, mm = res["stamp"], res["matmul"]
    rates = res.get("matmul_rates", [mm])
    compared = any("speedup_vs_first" in r for r in res["rows"])
    lines = [
        "## Milliseconds per outer step, peak memory and FLOP rate",
        "",
        f"{s['date']}, {s['hardware']}, device {res['device']}, torch {s['torch']}, commit {s['commit']}. "
        f"Profile `{res['profile']}`; median of {res['steps']} steps after one warm-up. Dense matmul rate of the "
        f"same run: {', '.join(_rate_line(r) for r in rates)}. Peak memory: {res['memory']}. "
        f"FLOPs: {res['flop_counting']}.",
    ]
    if "cuda_conv_tf32" in res:
        tf32 = "on (PyTorch's default)" if res["cuda_conv_tf32"] else "off"
        lines += ["", f"fp32 rows: cuDNN convolutions with TF32 {tf32}; matmuls as the rate above says."]
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    if "precision_probe" in res:
        lines += ["", f"Precision policy (`auto`): {res['precision_reason']}."]
    if compared:
        lines += [
            "",
            "Precisions compared in one run, their steps interleaved; *vs* is the median ratio of paired steps "
            "(first precision's time over this one's). *Of matmul rate*: of the rate of the precision the row ran in.",
        ]
    lines += [
        "",
        "| method | input | IPC | real batch | allocator | precision | ms/step |"
        + (" vs |" if compared else "")
        + " peak memory (MiB) | GFLOP/step | GFLOP/s | of matmul rate |",
        "|---|---|---|---|---|---|---|" + ("---|" if compared else "") + "---|---|---|---|",
    ]
    before: dict[tuple, float] = {}
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['input']} | {r['ipc']} | – | – | – | {r['error']} |")
            continue
        key = (r["method"], r["input"], r["ipc"], r.get("precision"))
        alloc = r.get("allocator", "–")
        if alloc == "default":
            before[key] = r["median_ms"]
        elif alloc == "tuned" and key in before:  # the after of a before/after pair
            alloc += f" ({100 * (r['median_ms'] / before[key] - 1):+.0f} %)"
        prec = r.get("precision", "fp32")
        resolved = r.get("precision_resolved", "fp32")
        prec = prec if prec == resolved else f"{prec} → {resolved}"
        vs = ""
        if compared:
            vs = f" {r['speedup_vs_first']:.2f}x |" if "speedup_vs_first" in r else " – |"
        if r.get("gflops") is None:  # FLOPs not countable for this method (forward-mode AD)
            flop_cells = "– | – | – |"
        else:
            flop_cells = f"{r['flops_per_step'] / 1e9:.2f} | {r['gflops']:.1f} | {100 * r['matmul_fraction']:.1f} % |"
        lines.append(
            f"| {r['method']} | {r['input']} | {r['ipc']} | {r['real_batch']} | {alloc} | {prec} "
            f"| {r['median_ms']:.1f} |{vs} {r['peak_mb']:.0f} | {flop_cells}"
        )
    phased = [r for r in res["rows"] if r.get("phases_ms")]
    if phased:
        names = list(dict.fromkeys(k for r in phased for k in r["phases_ms"]))
        lines += [
            "",
            "### Where a step goes (the method's own phase timings, median ms)",
            "",
            "| method | input | IPC | precision | " + " | ".join(names) + " | step |",
            "|---|---|---|---|" + "---|" * (len(names) + 1),
        ]
        for r in phased:
            cells = " | ".join(f"{r['phases_ms'].get(k, float('nan')):.0f}" for k in names)
            lines.append(
                f"| {r['method']} | {r['input']} | {r['ipc']} | {r.get('precision_resolved', 'fp32')} | {cells} "
                f"| {r['median_ms']:.0f} |"
            )
    for r in res["rows"]:
        if r.get("profile"):
            lines += [
                "",
                f"### One step under torch.profiler: {r['method']}, {r['input']}, IPC {r['ipc']}, "
                f"{r.get('precision_resolved', 'fp32')}",
                "",
                "| operator | self CPU ms | share | calls |",
                "|---|---|---|---|",
            ]
            for e in r["profile"]:
                lines.append(f"| `{e['op']}` | {e['self_cpu_ms']:.1f} | {100 * e['share']:.1f} % | {e['calls']} |")
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
    p.add_argument(
        "--precision",
        default="fp32",
        help="comma-separated precisions to compare, interleaved: fp32, bf16, auto, or policy (= auto, the "
        "precision policy's own choice), e.g. fp32,policy; the first is the reference of the vs column",
    )
    p.add_argument("--inputs", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="input shapes to time")
    p.add_argument("--profile-top", type=int, default=0, help="profile one more step per row: keep the top N ops")
    p.add_argument("--note", default="", help="a remark recorded with the results (e.g. that the machine was shared)")
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
    names = [x.strip() for x in a.precision.split(",") if x.strip()]
    bad = [x for x in names if x not in PRECISION_NAMES]
    if bad or not names:
        p.error(f"unknown precision {', '.join(bad) or '(none)'}; choose from {', '.join(PRECISION_NAMES)}")
    precisions = [PRECISION_NAMES[x] for x in names]

    probe = bf16_probe(a.device) if "auto" in precisions else None
    resolved = {PrecisionPolicy(x).resolve(a.device) for x in precisions}
    dtypes = ("float32", "bfloat16") if "bf16" in resolved else ("float32",)
    rates = matmul_rates(a.device, matmul_size(a.device, a.matmul_size, dtypes), dtypes)
    mm = rates[0]
    rate_of = {"fp32": rates[0]["gflops"], "bf16": rates[-1]["gflops"]}
    for r in rates:
        print(f"dense {r['dtype']} matmul {r['size']}²: {r['gflops']:.1f} GFLOP/s", flush=True)
    if probe is not None:
        print(f"precision policy: {probe.reason()}", flush=True)
    memory = PeakMemory(a.device)
    rows: list[dict[str, Any]] = []
    out = Path(a.out)
    partial = out / f"{a.name}.partial.json"

    def result() -> dict[str, Any]:
        res = {
            "stamp": stamp(),
            "device": a.device,
            "profile": profile,
            "steps": a.steps,
            "matmul": mm,
            "matmul_rates": rates,
            "precisions": precisions,
            "memory": memory.how,
            "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one step (matmul/conv, forward and "
            "backward)",
            "rows": rows,
        }
        if a.device.startswith("cuda"):
            # What "fp32" means for the networks there: cuDNN runs fp32 convolutions in TF32 unless told not to
            # (PyTorch's default), while the matmul rate above is timed with TF32 off.
            res["cuda_conv_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        if a.note:
            res["note"] = a.note
        if probe is not None:
            res["precision_probe"] = probe.to_dict()
            res["precision_reason"] = probe.reason()
        return res

    for name in chosen:
        for label in a.inputs:
            shape = SHAPES[label]
            for ipc in a.ipcs:
                for alloc in allocators:
                    if a.device == "cpu":
                        tune_cpu_allocator(alloc == "tuned")
                    try:
                        measured = measure_variants(
                            name, shape, ipc, a.steps, a.device, profile, memory, precisions, a.profile_top
                        )
                    except (RuntimeError, ValueError) as e:  # out of memory, a method that cannot run this shape
                        r = {"method": name, "input": label, "ipc": ipc, "error": f"{type(e).__name__}: {e}"[:200]}
                        print(f"{name:14s} {label:10s} IPC {ipc:3d}: {r['error']}", flush=True)
                        rows.append(r)
                        continue
                    for r in measured:
                        r["allocator"] = alloc if a.device == "cpu" else "cuda caching"
                        counted = r["gflops"] is not None
                        r["matmul_fraction"] = r["gflops"] / rate_of[r["precision_resolved"]] if counted else None
                        rows.append(r)
                        vs = f", {r['speedup_vs_first']:.2f}x" if "speedup_vs_first" in r else ""
                        rate = f"{r['gflops']:8.2f} GFLOP/s ({100 * r['matmul_fraction']:.1f} %)" if counted else "-"
                        print(
                            f"{name:14s} {r['input']:10s} IPC {ipc:3d} {r['allocator']:8s} "
                            f"{r['precision_resolved']:4s}: {r['median_ms']:9.1f} ms/step{vs}, {r['peak_mb']:7.0f} "
                            f"MiB, {rate}",
                            flush=True,
                        )
                    # Every finished configuration is kept as it lands: a run stopped part-way (a time limit on a
                    # lent GPU) leaves its rows in NAME.partial.json.
                    out.mkdir(parents=True, exist_ok=True)
                    with atomic_path(partial) as tmp:
                        tmp.write_text(json.dumps(result(), indent=2))
    res = result()
    write_result(out / f"{a.name}.json", json.dumps(res, indent=2))
    partial.unlink(missing_ok=True)
    write_result(out / f"{a.name}.md", markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
