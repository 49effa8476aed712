"""Precision policy of network passes: bf16 + channels-last where the hardware has fast bf16, float32 otherwise.

Only *network passes* (pool features, online steps, evaluation networks) follow the policy. Kernel matrices, ridge
and linear solves, implicit gradients and reverse-pass accumulations stay float32/float64 whatever it says:
:func:`~lightning_distill.functional.kernels.krr_predict` casts its inputs up and disables autocast inside, and
parameters, their gradients and optimiser states stay float32 (autocast casts copies of the weights per pass).

``auto`` does not trust the instruction flags alone: the first time a device is resolved, a short ``1024²``
matmul measurement (cached per process) must show bf16 at least :data:`MIN_SPEEDUP` times faster than float32.
A processor that advertises the instructions but runs bf16 through a slow path (old oneDNN, an emulated CUDA path,
a capped ``ATEN_CPU_CAPABILITY``) stays in float32.

    policy = PrecisionPolicy("auto").bind(device)   # a NetworkPrecision, resolved once
    features = policy.call(net, x)                  # bf16 inside; float32 out, weights and gradients outside
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

__all__ = [
    "MIN_SPEEDUP",
    "FP32",
    "Bf16Probe",
    "NetworkPrecision",
    "PRECISION_ENV",
    "PrecisionMode",
    "PrecisionPolicy",
    "ResolvedPrecision",
    "bf16_probe",
    "clear_probe_cache",
    "cpu_bf16_instructions",
    "default_precision",
    "read_cpu_flags",
]

#: What a method or an evaluation accepts: ``auto`` decides per device, the others force a mode.
PrecisionMode = Literal["auto", "fp32", "bf16"]
#: What a policy resolves to on a device.
ResolvedPrecision = Literal["fp32", "bf16"]

#: The environment variable that sets the precision of a method whose recipe states none (``fp32``, ``bf16`` or
#: ``auto``; unset: ``auto``). A cluster that wants float32 everywhere sets it once; the test suite sets ``fp32``.
PRECISION_ENV = "LIGHTNING_DISTILL_PRECISION"

#: bf16 must run the probe matmul at least this many times faster than float32 for ``auto`` to choose it: below
#: that the rounding of every activation is not worth it (and a noisy tie must not flip a run's precision).
MIN_SPEEDUP = 1.5
#: CPU flags (``/proc/cpuinfo``) of instructions that make bf16 matmuls and convolutions fast in oneDNN.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Side of the square probe matmul (CPU; twice that on a GPU, where a 1024² product is too short to time against
#: launch latency) and the number of interleaved float32/bf16 timings (median of each).
PROBE_SIZE = 1024
PROBE_REPEATS = 5

_CPUINFO = Path("/proc/cpuinfo")


# ------------------------------------------------------------------------------------------------ detection
def read_cpu_flags() -> frozenset[str] | None:
    """The CPU's instruction flags from ``/proc/cpuinfo`` (Linux), or ``None`` where that file cannot be read."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def default_precision() -> PrecisionMode:
    """The mode of a method given no ``precision``: ``$LIGHTNING_DISTILL_PRECISION``, else ``auto``.

    Raises:
        ValueError: the variable holds something other than ``fp32``, ``bf16`` or ``auto``.
    """
    value = os.environ.get(PRECISION_ENV, "").strip().lower() or "auto"
    if value not in get_args(PrecisionMode):
        raise ValueError(
            f"{PRECISION_ENV}={os.environ.get(PRECISION_ENV)!r} is not a precision: set it to "
            f"{', '.join(get_args(PrecisionMode))}, or unset it for auto"
        )
    return value  # type: ignore[return-value]


def _torch_cpu_bf16_instructions() -> tuple[str, ...]:
    # Without /proc/cpuinfo (macOS, Windows) torch's own CPUID checks answer; they are private, hence getattr.
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    found = []
    for flag, name in checks.items():
        check = getattr(torch.cpu, name, None)
        with contextlib.suppress(Exception):
            if check is not None and check():
                found.append(flag)
    return tuple(found)


def cpu_bf16_instructions() -> tuple[str, ...]:
    """The fast-bf16 instruction sets this CPU has (a subset of :data:`CPU_BF16_FLAGS`; empty when none)."""
    flags = read_cpu_flags()
    if flags is None:
        return _torch_cpu_bf16_instructions()
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def _cuda_bf16_native() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        # including_emulation=False: torch otherwise reports bf16 on pre-Ampere GPUs, where it is emulated (slow).
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # pragma: no cover - torch < 2.3 has no emulation flag (and reports native support only)
        return bool(torch.cuda.is_bf16_supported())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_size(device: torch.device) -> int:
    """Side of the probe matmul on ``device``."""
    return PROBE_SIZE if device.type == "cpu" else 2 * PROBE_SIZE


def measure_matmul_seconds(
    device: torch.device, size: int | None = None, repeats: int = PROBE_REPEATS
) -> tuple[float, float]:
    """Median seconds of one ``size²`` matmul in float32 and in bf16 on ``device``, timed interleaved.

    Interleaving (fp32, bf16, fp32, ...) keeps a noisy neighbour from biasing one side. On CUDA each timing covers
    several products, so kernel-launch latency does not decide the comparison.
    """
    size = size or probe_size(device)
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(size, size, generator=gen).to(device)
    b32 = torch.randn(size, size, generator=gen).to(device)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    inner = 10 if device.type == "cuda" else 1
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    pairs = {torch.float32: (a32, b32), torch.bfloat16: (a16, b16)}
    # Autocast off: a caller's bf16 region would otherwise turn the float32 side into bf16 as well.
    with torch.autocast(device.type, enabled=False):
        for a, b in pairs.values():  # warm-up: library initialisation, kernel selection, AMX tile set-up
            a @ b
        for _ in range(repeats):
            for dtype, (a, b) in pairs.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    a @ b
                _sync(device)
                times[dtype].append((time.perf_counter() - start) / inner)
    return statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])


@dataclass(frozen=True)
class Bf16Probe:
    """What the start-up check found on one device.

    Attributes:
        device: the device probed (``cpu``, ``cuda:0``).
        instructions: the hardware's fast-bf16 support: CPU flags found (``amx_bf16``, ``avx512_bf16``), ``cuda``
            for a GPU with native bf16, empty when none (then nothing is measured).
        fp32_ms: median milliseconds of the float32 probe matmul (``None`` when not measured).
        bf16_ms: the same in bf16.
        threads: torch CPU threads during the measurement.
        size: side of the probe matmul.
    """

    device: str
    instructions: tuple[str, ...]
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    threads: int = 1
    size: int = PROBE_SIZE

    @property
    def speedup(self) -> float | None:
        """float32 time over bf16 time of the probe matmul."""
        if self.fp32_ms is None or self.bf16_ms is None or self.bf16_ms <= 0:
            return None
        return self.fp32_ms / self.bf16_ms

    @property
    def fast(self) -> bool:
        """Whether bf16 is both supported and measured at least :data:`MIN_SPEEDUP` times faster."""
        return bool(self.instructions) and self.speedup is not None and self.speedup >= MIN_SPEEDUP

    def reason(self) -> str:
        """One line saying why ``auto`` resolves as it does here."""
        if not self.instructions:
            what = "no GPU with native bf16" if self.device.startswith("cuda") else "no amx_bf16/avx512_bf16"
            return f"{self.device}: {what}"
        verdict = "faster" if self.fast else f"below the {MIN_SPEEDUP}x needed"
        return (
            f"{self.device} ({', '.join(self.instructions)}): bf16 matmul {self.size}² {self.speedup:.2f}x float32 "
            f"({self.bf16_ms:.2f} vs {self.fp32_ms:.2f} ms, {self.threads} threads), {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for logs and exports."""
        return {
            "device": self.device,
            "instructions": list(self.instructions),
            "fp32_ms": self.fp32_ms,
            "bf16_ms": self.bf16_ms,
            "speedup": self.speedup,
            "threads": self.threads,
            "size": self.size,
            "fast": self.fast,
        }


_PROBES: dict[tuple[str, int], Bf16Probe] = {}


def _canonical(device: torch.device | str) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def bf16_probe(device: torch.device | str) -> Bf16Probe:
    """Check ``device`` for fast bf16 once per process (and per CPU thread count, which changes the rates)."""
    d = _canonical(device)
    key = (str(d), torch.get_num_threads())
    if key not in _PROBES:
        if d.type == "cpu":
            instructions = cpu_bf16_instructions()
        elif d.type == "cuda":
            instructions = ("cuda",) if _cuda_bf16_native() else ()
        else:  # mps, xpu, ...: not measured here, so not assumed
            instructions = ()
        threads, size = torch.get_num_threads(), probe_size(d)
        probe = Bf16Probe(str(d), instructions, threads=threads, size=size)
        if instructions:
            fp32_s, bf16_s = measure_matmul_seconds(d)
            probe = Bf16Probe(str(d), instructions, 1000 * fp32_s, 1000 * bf16_s, threads, size)
        _PROBES[key] = probe
    return _PROBES[key]


def clear_probe_cache() -> None:
    """Forget every probe (tests; a process whose hardware situation changed)."""
    _PROBES.clear()


# --------------------------------------------------------------------------------------------- the policy
def _channels_last(x: Tensor) -> Tensor:
    """``x`` with the strides of NHWC, copied (differentiably) unless it has them already.

    ``x.contiguous(memory_format=torch.channels_last)`` returns a one-channel NCHW batch unchanged, since it counts
    as channels-last contiguous too; convolutions then pick the NCHW path for the whole network (torch asks the
    strides, ``stride(1) == 1``), and bf16 pooling on NCHW is several times slower than on NHWC.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1:
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


@dataclass(frozen=True)
class NetworkPrecision:
    """A resolved policy for one device: how network passes run there.

    Under ``bf16`` a pass runs in ``torch.autocast(device_type, dtype=torch.bfloat16)`` on channels-last inputs
    (and modules); under ``fp32`` every helper is the identity, so float32 code paths stay bitwise as before.

    Attributes:
        dtype: ``fp32`` or ``bf16``.
        device_type: ``cpu``, ``cuda``, ... (what autocast needs).
        requested: the mode it was resolved from.
        reason: why it resolved so (for the log line).
    """

    dtype: ResolvedPrecision = "fp32"
    device_type: str = "cpu"
    requested: PrecisionMode = "fp32"
    reason: str = "fp32 requested"

    @property
    def bf16(self) -> bool:
        """Whether network passes run in bf16."""
        return self.dtype == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The region of a network pass: bf16 autocast, or nothing under ``fp32``."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def input(self, x: Tensor) -> Tensor:
        """``x`` in the pass's memory format: channels-last for a 4-D batch under bf16 (differentiable), else ``x``.

        oneDNN and cuDNN run bf16 convolutions fastest on NHWC; with an NCHW input they reorder at every layer.
        """
        if self.bf16 and x.dim() == 4:
            return _channels_last(x)
        return x

    def module(self, net: nn.Module) -> nn.Module:
        """``net`` with its 4-D weights converted to channels-last under bf16 (in place, as ``Module.to``)."""
        return net.to(memory_format=torch.channels_last) if self.bf16 else net

    def output(self, y: Tensor) -> Tensor:
        """A pass's result back in float32, so losses, kernels and targets downstream never see bf16."""
        return y.float() if self.bf16 and y.is_floating_point() else y

    def call(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """One network pass ``fn(x)`` under the policy: ``x`` in the pass's memory format, inside :meth:`autocast`,
        the result in float32 (``fn`` alone under ``fp32``)."""
        with self.autocast():
            return self.output(fn(self.input(x)))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for logs and exports."""
        return {
            "requested": self.requested,
            "resolved": self.dtype,
            "device_type": self.device_type,
            "reason": self.reason,
        }


#: The policy of code that was given none: float32, the identity everywhere.
FP32 = NetworkPrecision()


@dataclass(frozen=True)
class PrecisionPolicy:
    """The requested mode of network passes; :meth:`resolve` decides it for a device.

    Args:
        mode: ``fp32`` (always float32), ``bf16`` (always bf16 autocast, even where it is slow or emulated),
            ``auto`` (bf16 where :func:`bf16_probe` finds the instructions and measures them fast, else float32), or
            ``None`` for :func:`default_precision` (``$LIGHTNING_DISTILL_PRECISION``, else ``auto``).
    """

    mode: PrecisionMode | None = "fp32"

    def __post_init__(self) -> None:
        if self.mode is None:
            object.__setattr__(self, "mode", default_precision())
        if self.mode not in get_args(PrecisionMode):
            raise ValueError(f"precision must be one of {', '.join(get_args(PrecisionMode))}, got {self.mode!r}")

    def resolve(self, device: torch.device | str) -> ResolvedPrecision:
        """The effective mode on ``device``: ``bf16`` or ``fp32``."""
        return self.bind(device).dtype

    def bind(self, device: torch.device | str) -> NetworkPrecision:
        """The resolved policy for ``device`` (runs the cached start-up probe under ``auto``)."""
        d = torch.device(device)
        if self.mode == "fp32":
            return NetworkPrecision("fp32", d.type, "fp32", "fp32 requested")
        if self.mode == "bf16":
            return NetworkPrecision("bf16", d.type, "bf16", "bf16 requested")
        probe = bf16_probe(d)
        return NetworkPrecision("bf16" if probe.fast else "fp32", d.type, "auto", f"auto: {probe.reason()}")
