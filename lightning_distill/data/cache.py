"""Where data and caches live, atomic cache writes, and the dataset-not-found error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_distill.io import atomic_path

DATA_ENV = "LIGHTNING_DISTILL_DATA"
CACHE_ENV = "LIGHTNING_DISTILL_CACHE"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or its root folder) is not on disk; the message says how to get it."""


def default_data_root() -> Path:
    """The data root used when none is passed: ``$LIGHTNING_DISTILL_DATA``, else ``~/.cache/lightning_distill/data``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_distill" / "data"


def default_cache_dir() -> Path:
    """The cache folder (ZCA, decoded images): ``$LIGHTNING_DISTILL_CACHE``, else ``~/.cache/lightning_distill``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_distill"


def cache_subdir(name: str) -> Path:
    """``default_cache_dir() / name``, created if missing."""
    path = default_cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_torch_save(obj: Any, dest: Path) -> None:
    """``torch.save`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


def atomic_savez(dest: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed, fast to read) to ``dest`` atomically."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def digest(*parts: Any) -> str:
    """A short stable hash of strings, numbers, arrays and tensors (used in cache file names)."""
    h = hashlib.blake2b(digest_size=10)
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            h.update(str((part.dtype.str, part.shape)).encode())
            h.update(np.ascontiguousarray(part).data)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()
