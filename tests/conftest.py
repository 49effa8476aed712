"""Shared fixtures: the real-data roots (the shipped fixture, or the full data), caches and thread counts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# A method given no precision follows $LIGHTNING_DISTILL_PRECISION, else auto (bf16 on a CPU with AMX): the suite pins
# float32 so that its closed-form and bit-exact checks mean the same on every machine (and in the subprocesses it
# starts); tests of the default and of bf16 ask for them explicitly.
os.environ.setdefault("LIGHTNING_DISTILL_PRECISION", "fp32")

REPO = Path(__file__).resolve().parents[1]
#: The small real-data fixture shipped with the repository (see tests/fixtures/README.md).
FIXTURE_ROOT = REPO / "tests" / "fixtures" / "datasets"
DATA_ENV = "LIGHTNING_DISTILL_DATA"

# What a folder must hold to count as the full data: (file, its size in bytes) for MNIST and Fashion-MNIST, and the
# offline CIFAR-10 array file (see the full data's README).
_FULL_IDX = ("MNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/train-images-idx3-ubyte")
_FULL_IDX_BYTES = 16 + 60000 * 28 * 28
_FULL_CIFAR = ("CIFAR10/cifar10.npz.xz", "CIFAR10/cifar10.npz", "cifar-10-batches-py/data_batch_5")


def _data_root() -> Path:
    """``$LIGHTNING_DISTILL_DATA`` when set (it must hold MNIST/raw), else the shipped fixture."""
    env = os.environ.get(DATA_ENV)
    if not env:
        return FIXTURE_ROOT
    root = Path(env).expanduser()
    if not (root / "MNIST" / "raw").is_dir():
        raise RuntimeError(
            f"{DATA_ENV}={env} holds no MNIST/raw: point it at a folder holding the real data "
            f"(CI: ../shared/datasets), or unset it to use the fixture in {FIXTURE_ROOT.relative_to(REPO)}"
        )
    return root


def _missing_full_data(root: Path) -> list[str]:
    """What ``root`` lacks of the full MNIST, Fashion-MNIST and CIFAR-10 (empty when it holds them all)."""
    missing = []
    for rel in _FULL_IDX:
        path = root / rel
        if not path.is_file() or path.stat().st_size != _FULL_IDX_BYTES:
            missing.append(f"{rel} with all 60000 images")
    if not any((root / rel).is_file() for rel in _FULL_CIFAR):
        missing.append(_FULL_CIFAR[0])
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that asks for the full data is a full_data test, marked or not (so `-m "not full_data"` leaves it out).
    for item in items:
        if "full_data_root" in getattr(item, "fixturenames", ()) and item.get_closest_marker("full_data") is None:
            item.add_marker(pytest.mark.full_data)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding MNIST/, FashionMNIST/ and CIFAR10/: ``$LIGHTNING_DISTILL_DATA``, else the shipped fixture.

    Tests that use it must pass on the fixture (3000 train / 1000 test MNIST and Fashion-MNIST images, 30 + 10
    CIFAR-10 images per class) and on the full data alike; see tests/fixtures/README.md.
    """
    return _data_root()


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    """The shipped fixture itself, whatever ``$LIGHTNING_DISTILL_DATA`` says (for checks of its exact contents)."""
    return FIXTURE_ROOT


@pytest.fixture(scope="session")
def full_data_root() -> Path:
    """The full datasets (``$LIGHTNING_DISTILL_DATA``); the test is skipped unless that folder holds them.

    Use it (and mark the test ``full_data``) only where a test needs the whole sets: exact full-size counts,
    published statistics. CI sets ``LIGHTNING_DISTILL_DATA=../shared/datasets``, so these tests run there.
    """
    env = os.environ.get(DATA_ENV)
    if not env:
        pytest.skip(f"needs the full datasets: set {DATA_ENV} to the folder holding them (CI: ../shared/datasets)")
    root = Path(env).expanduser()
    missing = _missing_full_data(root)
    if missing:
        pytest.skip(f"needs the full datasets, but {DATA_ENV}={env} lacks {', '.join(missing)}")
    return root


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Caches (ZCA fits, decompressed array files) go to a temporary folder unless LIGHTNING_DISTILL_CACHE is set.

    Never beside the data: the fixture under tests/fixtures stays as committed.
    """
    if os.environ.get("LIGHTNING_DISTILL_CACHE"):
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path_factory.mktemp("lightning_distill_cache")))
        yield


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
