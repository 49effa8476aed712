"""Score an exported distilled set: rebuild its test split with the recorded preprocessing and train on it."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_distill.eval.protocols import NO_FLIP_DATASETS, Protocol, get_protocol
from lightning_distill.eval.train import EvalResult, train_on_distilled
from lightning_distill.export import load_distilled, set_digest
from lightning_distill.precision import PrecisionMode

#: What every network constructor receives from the evaluation itself; never a user's option.
_NET_SHAPE_ARGS = frozenset({"in_channels", "num_classes", "image_size"})


def datamodule_for(
    payload: dict[str, Any], root: str | None = None, path: str | None = None, where: str | None = None
) -> Any:
    """The export's DataModule rebuilt from its record, not set up (its raw splits are read with ``load_split``).

    Only a registered DataModule (:func:`lightning_distill.data.register_datamodule`) is rebuilt, with plain-valued
    arguments its ``__init__`` accepts; the file's class path is compared as a string and never imported.

    Args:
        payload: a loaded export.
        root: overrides the recorded data root.
        path: overrides the recorded file or folder (array and ImageFolder data).
        where: the export's file name, for the messages.

    Raises:
        ValueError: the file names an unregistered DataModule or arguments it does not take.
    """
    from lightning_distill.data import DATASETS, accepted_arguments, canonical_name, check_datamodule_record

    where = where or "the export"
    dm_info = payload.get("datamodule") or {}
    if dm_info.get("class_path") is not None:
        cls, init_args = check_datamodule_record(dm_info, where)
    else:  # exports made before the class path was recorded name only their dataset
        name = canonical_name(str(payload.get("dataset", "")))
        if name not in DATASETS:
            raise ValueError(
                f"{where} records neither a DataModule nor a known dataset ({payload.get('dataset')!r}): "
                f"known datasets are {', '.join(DATASETS)}"
            )
        cls = DATASETS[name]
        record = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dm_info.get("init_args") or {}}
        cls, init_args = check_datamodule_record(record, where)
    accepted = accepted_arguments(cls)
    for key, value, option in (("root", root, "root / --root"), ("path", path, "data_path / --data-path")):
        if value is None:
            continue
        if accepted is not None and key not in accepted:
            raise ValueError(f"{option} does not apply to {cls.__name__} (it takes {', '.join(sorted(accepted))})")
        init_args[key] = value
    return cls(**init_args)


def describe_export(path: str | os.PathLike, payload: dict[str, Any]) -> dict[str, Any]:
    """Which set a score is of, recorded beside every score of an export (``evaluate`` and ``privacy``): its file,
    dataset, IPC, method, label kind, step and the precision its network passes were distilled under."""
    return {
        "path": str(path),
        "dataset": payload["dataset"],
        "ipc": int(payload["ipc"]),
        "method": payload["method"],
        "label_kind": payload["label_kind"],
        "step": payload.get("step"),  # older exports do not record it
        "distilled_precision": (payload.get("config") or {}).get("precision_resolved"),
    }


def test_split_for(
    payload: dict[str, Any], root: str | None = None, path: str | None = None, where: str | None = None
) -> tuple[Tensor, Tensor]:
    """The real test split of the export's dataset, in the export's model-input space.

    The DataModule is rebuilt by :func:`datamodule_for` (registered classes only, never imported from the file).

    Args:
        payload: a loaded export.
        root: overrides the recorded data root.
        path: overrides the recorded file or folder (array and ImageFolder data).
        where: the export's file name, for the messages.

    Raises:
        ValueError: the file names an unregistered DataModule or arguments it does not take.
    """
    from lightning_distill.data.preprocess import Preprocessing

    where = where or "the export"
    dm = datamodule_for(payload, root, path, where)  # the class check comes first, as it always did
    try:
        prep = Preprocessing.from_dict(payload["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its recorded preprocessing is not usable ({type(e).__name__}: {e})") from None
    x_raw, y = dm.load_split("test")
    check_shapes(payload, prep, x_raw, y, where)
    return prep.apply(x_raw.float() / 255.0), y


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded or trained.

    Raises:
        ValueError: an unknown device string, or a CUDA/MPS device that is not available (one line, with the fix).
    """
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {str(device)!r} is not a device: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r} asked for, but no CUDA GPU is available here "
                "(torch.cuda.is_available() is False): pass --device cpu, or leave the device unset"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s): cuda:0 ..")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available here: pass --device cpu")


def check_length(steps: int | None = None, epochs: int | None = None) -> None:
    """Refuse a training length that trains nothing: an untrained network's accuracy is not a result."""
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(
                f"{name} must be at least 1, got {value!r}: {value!r} {name} would score an untrained network "
                f"(leave --{name} unset for the protocol's own length)"
            )


def net_options(name: str) -> set[str] | None:
    """The options (``arch_kwargs`` keys) the registered network ``name`` accepts; None: any (not knowable).

    A constructor's own keyword parameters count, and where it forwards ``**kwargs`` to the class it returns (its
    return annotation, e.g. ``convnet(...) -> ConvNet``) that class's ``__init__`` parameters too.
    """
    from lightning_distill.nets import list_nets
    from lightning_distill.nets.registry import _REGISTRY

    if name not in list_nets():
        raise ValueError(f"unknown architecture {name}; choose from {', '.join(list_nets())}")
    names: set[str] = set()
    target: Any = _REGISTRY[name]
    seen: set[Any] = set()
    while target is not None and target not in seen:
        seen.add(target)
        fn = target.__init__ if isinstance(target, type) else target
        params = list(inspect.signature(fn).parameters.values())
        if isinstance(target, type):
            params = params[1:]  # self
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - _NET_SHAPE_ARGS
        target = _forwarded_to(target)
    return None


def _forwarded_to(target: Any) -> type | None:
    # Where a constructor's **kwargs go: a class's base (super().__init__(**kwargs)), a factory's returned class.
    if isinstance(target, type):
        return next((k for k in target.__mro__[1:] if "__init__" in k.__dict__ and k is not object), None)
    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:  # an annotation that does not resolve: the options are not knowable
        return None
    return returned if isinstance(returned, type) else None


def check_arch_kwargs(
    protocol: str | Protocol, archs: Sequence[str | None], arch_kwargs: dict[str, Any] | None
) -> None:
    """Refuse network options the networks do not take, before any training; the message lists the accepted ones.

    Args:
        protocol: the protocol (its network stands for an ``arch`` of None).
        archs: the networks to be trained (None: the protocol's).
        arch_kwargs: the user's options, merged over the protocol's.
    """
    if not arch_kwargs:
        return
    spec = get_protocol(protocol)
    for arch in archs:
        name = arch or spec.arch
        accepted = net_options(name)
        if accepted is None:
            continue
        unknown = sorted(set(arch_kwargs) - accepted)
        if unknown:
            takes = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes no options"
            raise ValueError(f"--arch-kwargs: {name} takes no option {', '.join(unknown)}; {takes}")


def check_shapes(payload: dict[str, Any], prep: Any, x_test: Tensor, y_test: Tensor, where: str) -> None:
    """The set's images, its recorded preprocessing and the rebuilt test split must agree on the image shape, and the
    set's classes must cover the test labels: otherwise every accuracy would be of the wrong data."""

    def shape(s: Sequence[int]) -> str:
        return "x".join(str(int(d)) for d in s)

    set_shape, prep_shape, test_shape = tuple(payload["images"].shape[1:]), tuple(prep.image_shape), x_test.shape[1:]
    if not set_shape == prep_shape == tuple(test_shape):
        raise ValueError(
            f"{where}: the set's images are {shape(set_shape)} and its recorded preprocessing is for "
            f"{shape(prep_shape)}, but the rebuilt test split of {payload.get('dataset')} is {shape(test_shape)}: the "
            "file does not match its recorded dataset or preprocessing (pass the data it was distilled from: "
            "--root / --data-path)"
        )
    k = int(payload["num_classes"])
    if len(y_test) and (int(y_test.min()) < 0 or int(y_test.max()) >= k):
        raise ValueError(
            f"{where}: the test split of {payload.get('dataset')} has class ids up to {int(y_test.max())}, but the "
            f"set has {k} classes: the file does not match its recorded dataset"
        )


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
    precision: PrecisionMode = "fp32",
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
        precision: the networks' passes: ``fp32`` (the protocols' published figures), ``bf16`` (autocast,
            channels-last) or ``auto`` (bf16 where the device has it fast); recorded in the result.
    """
    # Everything that would make the numbers meaningless is refused here, before a network is trained.
    check_device(device)
    check_length(steps, epochs)
    check_arch_kwargs(protocol, [arch], arch_kwargs)
    payload = load_distilled(path)
    x_test, y_test = test_split_for(payload, root=root, path=data_path, where=str(path))  # checks the shapes too
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
        precision=precision,
    )
    result.extra.update(
        **describe_export(path, payload),
        set_digest=set_digest(payload),  # the very set scored: a repeated run replaces the file
        device=str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
    )
    return result
