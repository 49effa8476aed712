"""Score an exported distilled set: rebuild its test split with the recorded preprocessing and train on it."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import Tensor

from lightning_distill.eval.protocols import NO_FLIP_DATASETS, Protocol
from lightning_distill.eval.train import EvalResult, train_on_distilled
from lightning_distill.export import load_distilled


def test_split_for(payload: dict[str, Any], root: str | None = None, path: str | None = None) -> tuple[Tensor, Tensor]:
    """The real test split of the export's dataset, in the export's model-input space.

    Args:
        payload: a loaded export.
        root: overrides the recorded data root.
        path: overrides the recorded file or folder (array and ImageFolder data).
    """
    from lightning_distill.data import get_datamodule
    from lightning_distill.data.preprocess import Preprocessing

    dm_info = payload.get("datamodule") or {}
    init_args = {k: v for k, v in (dm_info.get("init_args") or {}).items() if not k.startswith("_") and k != "device"}
    if root is not None:
        init_args["root"] = root
    if path is not None:
        init_args["path"] = path
    class_path = dm_info.get("class_path")
    if class_path:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        dm = cls(**init_args)
    else:
        dm = get_datamodule(payload["dataset"], **init_args)
    x_raw, y = dm.load_split("test")
    prep = Preprocessing.from_dict(payload["preprocessing"])
    return prep.apply(x_raw.float() / 255.0), y


def evaluate_distilled(
    path: str | os.PathLike,
    protocol: str | Protocol = "dc",
    arch: str | None = None,
    repeats: int = 5,
    root: str | None = None,
    data_path: str | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    arch_kwargs: dict[str, Any] | None = None,
) -> EvalResult:
    """Train ``repeats`` fresh networks on the set in ``path`` and test them on its dataset's test split.

    ``lightning-distill evaluate`` is built from this signature and these descriptions: a new parameter here is a new
    command-line option.

    Args:
        path: the export written by ``ExportDistilled`` (``distilled.pt``).
        protocol: a protocol name (``dc``, ``krr`` or any other in ``lightning_distill.eval.PROTOCOLS``) or a
            :class:`Protocol`.
        arch: network registry name; ``None`` takes the protocol's network (with its options).
        repeats: fresh networks to train.
        root: data root holding the test split (default: the one recorded in the export).
        data_path: file or folder of array/ImageFolder data (default: the one recorded in the export).
        epochs: override the protocol's epochs.
        steps: override the protocol's total optimiser steps.
        seed: network ``i`` is initialised and augmented with ``seed + i``.
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: CUDA when available).
        progress: show a progress bar.
        arch_kwargs: network options, merged over the protocol's own (e.g. ``{"width": 64}``).
    """
    payload = load_distilled(path)
    x_test, y_test = test_split_for(payload, root=root, path=data_path)
    labels = payload["labels"]
    result = train_on_distilled(
        payload["images"],
        labels,
        x_test,
        y_test,
        protocol=protocol,
        arch=arch,
        repeats=repeats,
        num_classes=int(payload["num_classes"]),
        flip=payload["dataset"] not in NO_FLIP_DATASETS,
        epochs=epochs,
        steps=steps,
        seed=seed,
        device=device,
        progress=progress,
        arch_kwargs=arch_kwargs,
    )
    result.extra.update(
        path=str(path),
        dataset=payload["dataset"],
        ipc=int(payload["ipc"]),
        method=payload["method"],
        label_kind=payload["label_kind"],
        step=payload.get("step"),  # older exports do not record it
        device=str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
    )
    return result
