"""Process-level settings that make CPU runs faster; applied by the ``lightning-distill`` command and the benchmarks.

glibc's ``malloc`` serves large blocks (above a threshold of at most 32 MiB) with ``mmap`` and hands them back to
the OS on ``free``. PyTorch's CPU allocator has no cache of its own, so every large activation of every step is
mapped afresh and its pages are faulted in and zeroed by the kernel: on the 2-core benchmark machine that was about
20 % of a FRePo outer step and a quarter of a ``dc`` evaluation step (benchmarks/results/speed_allocator.md).
Keeping freed memory in the process removes that cost, at the price of a resident size that stays at its peak:
the trade that jemalloc and tcmalloc make for PyTorch on CPUs, here with no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's documented defaults, restored by ``tune_cpu_allocator(False)`` (used to measure before and after).
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
#: Set to ``0`` to leave the allocator as glibc configures it.
ENV_VAR = "LIGHTNING_DISTILL_TUNE_MALLOC"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None  # musl, macOS and Windows allocators have no mallopt with these meanings
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_cpu_allocator(enable: bool = True) -> bool:
    """Keep freed memory in the process (no ``mmap`` for large blocks, no trimming of the heap).

    Args:
        enable: ``False`` restores glibc's defaults (the measurement of "before").

    Returns:
        Whether the allocator now runs with the requested setting: ``False`` off glibc, or when
        ``LIGHTNING_DISTILL_TUNE_MALLOC=0`` asks to leave it alone (only for ``enable=True``).
    """
    if enable and os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _libc()
    if libc is None:
        return False
    mmap_max, trim = (0, 2**31 - 1) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    # mallopt returns 1 on success.
    return libc.mallopt(_M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1


@contextmanager
def flush_denormals(enable: bool = True) -> Iterator[None]:
    """Within the block, the calling thread flushes denormal floats to zero (x86 FTZ/DAZ), then stops again.

    A smooth ReLU ``softplus(βx)/β`` with a large β (RCIG: 60) computes ``exp(βx)`` for very negative ``βx``, whose
    results are denormal: on x86 each such operation takes a microcode assist, and softplus alone was 56 % of the
    RCIG pool network's forward pass on the 2-core benchmark machine (4.5x faster with flushing, same results to
    within 1e-38). Only the calling thread is affected (intra-op worker threads keep their own mode), so the gain is
    largest at one thread. Does nothing where the processor has no such mode.
    """
    if not enable:
        yield
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)
