"""lightning_distill.runtime: the glibc allocator setting of the command and the benchmarks."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from lightning_distill import runtime

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tune_and_restore_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)
    try:
        assert runtime.tune_cpu_allocator(True)
        # Large blocks now come from the heap; tensors behave exactly as before.
        x = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB, above glibc's largest mmap threshold
        assert float(x[-1]) == 16 * 2**20 - 1
        del x
    finally:
        assert runtime.tune_cpu_allocator(False)  # glibc's defaults again, for the rest of the test session


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_env_var_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(runtime.ENV_VAR, value)
    called = []
    monkeypatch.setattr(runtime, "_libc", lambda: called.append(1))
    assert runtime.tune_cpu_allocator(True) is False and not called


def test_no_glibc_means_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime._libc() is None and runtime.tune_cpu_allocator(True) is False
