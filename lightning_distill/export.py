"""The export format: one file per distilled set, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_distill.io import atomic_path
from lightning_distill.synthetic.base import DistilledView, SyntheticSet

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "images",
    "labels",
    "label_kind",
    "preprocessing",
    "dataset",
    "num_classes",
    "ipc",
    "method",
    "config",
    "seed",
    "version",
)


class ExportError(ValueError):
    """A file that is not a readable lightning-distill export."""


def build_export(
    view: DistilledView,
    synthetic: SyntheticSet,
    data_info: dict[str, Any],
    method: str,
    config: dict[str, Any],
    seed: int,
    step: int | None = None,
) -> dict[str, Any]:
    """Snapshot a distilled set into the export dictionary (float32 images and plain tensors, on the CPU).

    Args:
        view: what the method exports (:meth:`~lightning_distill.methods.DistillationMethod.distilled_view`).
        synthetic: the set's parameterisation (its ``ipc`` budget, class count and description are recorded).
        data_info: what the method recorded about the real data (``describe_datamodule``).
        method: the method's class name.
        config: the method's configuration (plain values).
        seed: the seed of the run.
        step: the outer step the snapshot was taken at (recorded when known, so a file says how far it got).
    """
    images = view.images.detach().to("cpu", torch.float32).contiguous()
    if view.labels.is_floating_point():
        labels = view.labels.detach().to("cpu", torch.float32).contiguous()
    else:
        labels = view.labels.detach().to("cpu", torch.int64).contiguous()
    return {
        "images": images,
        "labels": labels,
        "label_kind": view.label_kind,
        "preprocessing": data_info.get("preprocessing", {}),
        "dataset": data_info.get("dataset", "unknown"),
        "datamodule": data_info.get("datamodule", {}),
        "class_names": data_info.get("class_names", []),
        "num_classes": int(synthetic.num_classes),
        "ipc": int(synthetic.ipc),
        "images_per_class": int(view.images_per_class),
        "class_ids": view.class_ids.detach().to("cpu", torch.int64).contiguous(),
        # A factorised set also stores what generates its images (bases, coefficients) and what that costs.
        "extras": {k: v.detach().to("cpu").contiguous() for k, v in view.extras.items()},
        "storage": dict(view.storage),
        "view_source": view.source,
        "method": method,
        "config": config,
        "seed": int(seed),
        **({"step": int(step)} if step is not None else {}),
        "version": FORMAT_VERSION,
    }


def save_distilled(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    _validate(payload, str(path))
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_distilled(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an export written by :func:`save_distilled`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ExportError: the file is corrupt, not an export, or from an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no distilled set at {path}: pass the distilled.pt written by ExportDistilled")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on damaged files (RuntimeError, KeyError, UnpicklingError...)
        raise ExportError(
            f"{path} is not a readable lightning-distill export ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "the file is corrupt or truncated: export the set again"
        ) from None
    _validate(payload, str(path))
    return payload


def _validate(payload: Any, where: str) -> None:
    if not isinstance(payload, dict):
        raise ExportError(f"{where} holds a {type(payload).__name__}, not a lightning-distill export dictionary")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ExportError(f"{where} is not a lightning-distill export: missing {', '.join(missing)}")
    if payload["version"] > FORMAT_VERSION:
        raise ExportError(
            f"{where} has export format {payload['version']}; this lightning-distill reads up to {FORMAT_VERSION}: "
            "upgrade the package"
        )
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ExportError(f"{where}: images must be an (N, C, H, W) tensor")
    if not isinstance(labels, Tensor) or len(labels) != len(images):
        raise ExportError(f"{where}: labels must be a tensor with one row per image")
    if not torch.isfinite(images).all():
        raise ExportError(f"{where}: images contain NaN or infinity")
