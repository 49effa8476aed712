"""The export format: one file per distilled set, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import re
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
        # Which real training images the set was built from (a member chunk), for membership-inference evaluation.
        **({"member_indices": torch.tensor(data_info["members"], dtype=torch.int64)} if "members" in data_info else {}),
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

    The file is read with ``torch.load(weights_only=True)``: tensors and plain values only, so reading it runs no code
    from it. A file that needs more is refused as unsafe, and not loaded.

    Raises:
        FileNotFoundError: no file at ``path``.
        ExportError: the file is unsafe (pickled objects beyond tensors and plain values), corrupt, not an export, from
            an unknown format version, or holds values that cannot be right (NaN images, labels out of range).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no distilled set at {path}: pass the distilled.pt written by ExportDistilled")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _weights_only_refusal(str(e))
        if refused is None:
            raise ExportError(_corrupt(path, e)) from None
        raise ExportError(
            f"{path} is unsafe: it holds pickled objects beyond tensors and plain values ({refused}), which loading "
            "could run as code, so it was not loaded; an export written by ExportDistilled / save_distilled holds "
            "none: export the set again, or load the file yourself only if you trust where it came from"
        ) from None
    except Exception as e:  # torch raises many types on damaged files (RuntimeError, KeyError, EOFError...)
        raise ExportError(_corrupt(path, e)) from None
    _validate(payload, str(path))
    return payload


def set_digest(payload: dict[str, Any]) -> str:
    """A short hash of an export's images and labels: which version of a re-exported file a score belongs to.

    Results record it beside the file's path, because a run folder's ``distilled.pt`` is replaced when the run is
    repeated and the path alone would then name another set.
    """
    h = hashlib.sha256()
    for t in (payload["images"], payload["labels"]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _corrupt(path: Path, e: Exception) -> str:
    first = (str(e).splitlines() or [""])[0][:120]
    return (
        f"{path} is not a readable lightning-distill export ({type(e).__name__}: {first}); "
        "the file is corrupt or truncated: export the set again"
    )


#: Pickle opcodes (as byte values): an "Unsupported operand" that is one of them is a pickle weights_only refuses to
#: run; any other byte is damage.
_PICKLE_OPCODES = frozenset(ord(op.code) for op in pickletools.opcodes)


def _weights_only_refusal(message: str) -> str | None:
    """What ``weights_only`` refused in a well-formed pickle (a global, a call, an opcode); None: the file is damaged.

    torch raises ``UnpicklingError`` for both: a file asking for objects it will not build, and bytes that are not
    a pickle at all (it then reports the first bad byte as an "Unsupported operand").
    """
    if "Weights only load failed" not in message and "WeightsUnpickler" not in message:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it names {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        code = int(found.group(1))
        if code not in _PICKLE_OPCODES:
            return None
        name = next(op.name for op in pickletools.opcodes if ord(op.code) == code)
        return f"pickle operation {name}"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if detail and re.search(r"allowlist|add_safe_globals|Can only|reduce", detail.group(1), re.IGNORECASE):
        return detail.group(1).strip()[:120]
    return None


def _validate(payload: Any, where: str) -> None:
    if not isinstance(payload, dict):
        raise ExportError(f"{where} holds a {type(payload).__name__}, not a lightning-distill export dictionary")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ExportError(f"{where} is not a lightning-distill export: missing {', '.join(missing)}")
    version = payload["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ExportError(f"{where}: the format version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{where} has export format {version}; this lightning-distill reads up to {FORMAT_VERSION}: "
            "upgrade the package"
        )
    num_classes = payload["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ExportError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    for key in ("dataset", "method", "label_kind"):
        if not isinstance(payload[key], str):
            raise ExportError(f"{where}: {key} must be a string, got {type(payload[key]).__name__}")
    if not isinstance(payload["preprocessing"], dict):
        raise ExportError(f"{where}: preprocessing must be a mapping, got {type(payload['preprocessing']).__name__}")
    if not isinstance(payload.get("datamodule", {}), dict):
        raise ExportError(f"{where}: datamodule must be a mapping, got {type(payload['datamodule']).__name__}")
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ExportError(f"{where}: images must be a floating-point (N, C, H, W) tensor")
    if not isinstance(labels, Tensor) or len(labels) != len(images):
        raise ExportError(f"{where}: labels must be a tensor with one row per image")
    if not torch.isfinite(images).all():
        raise ExportError(f"{where}: images contain NaN or infinity")
    if labels.is_floating_point():
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ExportError(
                f"{where}: float labels must be (N, num_classes) = (N, {num_classes}), got {tuple(labels.shape)}"
            )
        if not torch.isfinite(labels).all():
            raise ExportError(f"{where}: labels contain NaN or infinity")
    else:
        if labels.ndim != 1 or labels.dtype == torch.bool:
            raise ExportError(f"{where}: hard labels must be (N,) integer class ids, got {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)]
            raise ExportError(
                f"{where}: hard labels must be class ids in [0, {num_classes}), but {len(bad)} are not "
                f"(e.g. {int(bad[0])}): the file is damaged or was edited; export the set again"
            )
