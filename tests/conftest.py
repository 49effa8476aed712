"""Shared fixtures: the real-data root and small real subsets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("LIGHTNING_DISTILL_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "datasets"
    if not (root / "MNIST" / "raw").is_dir():
        raise RuntimeError(
            f"real test data not found under {root}: set LIGHTNING_DISTILL_DATA to the folder holding MNIST/raw "
            "(CI sets it to ../shared/datasets)"
        )
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding MNIST/, FashionMNIST/ and CIFAR10/ (see ../shared/datasets/README.md)."""
    return _data_root()


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder (ZCA, decoded images) for this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; LIGHTNING_DISTILL_TEST_THREADS=1 keeps parallel runs from oversubscribing them.
    torch.set_num_threads(int(os.environ.get("LIGHTNING_DISTILL_TEST_THREADS", "2")))
    yield


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    # wandb keeps one global run: a test that leaves it open would make the next WandbLogger reuse it.
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
