"""Real datasets as in-memory DataModules, their preprocessing (mean/std, both ZCA conventions) and a registry."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_distill.data.arrays import ArrayDataModule, load_array_file
from lightning_distill.data.cache import DatasetNotFoundError, default_cache_dir, default_data_root
from lightning_distill.data.constants import CLASS_NAMES, DATASET_STATS, canonical_name
from lightning_distill.data.distilled import DistilledDataModule
from lightning_distill.data.folders import ImageFolderDataModule, TinyImageNetDataModule
from lightning_distill.data.imagenet64 import ImageNet64DataModule
from lightning_distill.data.preprocess import Preprocessing, ZCAFit, fit_zca, fit_zca_kornia, fit_zca_trace
from lightning_distill.data.real import RealBatchStream, RealDataModule
from lightning_distill.data.stream import ClassBalancedStream, ClassSubsetStream
from lightning_distill.data.torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

#: Canonical dataset name -> DataModule class.
DATASETS: dict[str, type[RealDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "tiny_imagenet": TinyImageNetDataModule,
    "imagenet64": ImageNet64DataModule,
}


#: ``module.qualname`` -> DataModule class: the only classes a file (an export) may ask to rebuild. The project's
#: own are here from the start; :func:`register_datamodule` adds a user's. A file's ``class_path`` is looked up in
#: this dict as a plain string and is never imported, so a file cannot name a callable of its choosing.
_REBUILDABLE: dict[str, type[RealDataModule]] = {}


def class_path_of(cls: type) -> str:
    """``module.qualname`` of ``cls``: how an export records its DataModule (``describe_datamodule``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_datamodule(cls: type[RealDataModule], *aliases: str) -> type[RealDataModule]:
    """Allow exports made with ``cls`` to rebuild it (``lightning-distill evaluate``, ``evaluate_distilled``).

    An export records its DataModule as a class path and arguments; evaluation rebuilds only the classes registered
    here. Register your own DataModule before evaluating its exports (usable as a decorator)::

        from lightning_distill.data import register_datamodule

        @register_datamodule
        class MyData(RealDataModule): ...

    Args:
        cls: a :class:`RealDataModule` subclass (evaluation calls its ``load_split("test")``).
        *aliases: further class paths the same class answers to (e.g. a re-export ``mypkg.MyData``).

    Returns:
        ``cls``, unchanged.

    Raises:
        TypeError: ``cls`` is not a RealDataModule subclass.
        ValueError: the class path is already registered for another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, RealDataModule)):
        raise TypeError(f"register_datamodule takes a RealDataModule subclass, got {cls!r}")
    for path in (class_path_of(cls), *aliases):
        known = _REBUILDABLE.get(path)
        if known is not None and known is not cls:
            raise ValueError(f"the DataModule class path {path!r} is already registered for {known!r}")
        _REBUILDABLE[path] = cls
    return cls


def registered_datamodules() -> dict[str, type[RealDataModule]]:
    """The class paths an export may name, with their classes (a copy)."""
    return dict(_REBUILDABLE)


def _is_plain(value: Any) -> bool:
    # What a recorded argument may be: JSON-like data, nothing that could carry behaviour.
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def accepted_arguments(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the base classes' ``__init__``.

    None: the chain ends in a ``**kwargs`` that nothing names (anything goes).
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        params = list(inspect.signature(init).parameters.values())[1:]  # without self
        kinds = {p.kind for p in params}
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            return names
    return None


def check_datamodule_record(record: Any, where: str = "the file") -> tuple[type[RealDataModule], dict[str, Any]]:
    """Check what an export records about its DataModule, before anything is imported or called.

    Args:
        record: the export's ``datamodule`` entry: ``{"class_path": str, "init_args": dict}``.
        where: the file, for the messages.

    Returns:
        The registered class and the arguments to call it with (private keys and ``device`` left out).

    Raises:
        ValueError: an unregistered class path, arguments that are not plain values, or arguments the class does
            not accept (one line each, naming what and how to fix it).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: the recorded DataModule is a {type(record).__name__}, not a mapping")
    class_path = record.get("class_path")
    if not isinstance(class_path, str):
        raise ValueError(f"{where}: the recorded DataModule has no class path (got {class_path!r})")
    cls = _REBUILDABLE.get(class_path)
    if cls is None:
        raise ValueError(
            f"{where} names the DataModule {class_path!r}, which is not registered, so nothing was imported or "
            "called: a file may only rebuild lightning_distill.data's DataModules and classes registered with "
            "lightning_distill.data.register_datamodule(YourDataModule) (from Python, before evaluate_distilled)"
        )
    init_args = record.get("init_args") or {}
    if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
        raise ValueError(f"{where}: the recorded arguments of {class_path} are not a mapping of names to values")
    # LightningCLI adds private keys (``_class_path``); the device is the recording run's, not the data's.
    init_args = {k: v for k, v in init_args.items() if not k.startswith("_") and k != "device"}
    odd = sorted(k for k, v in init_args.items() if not _is_plain(v))
    if odd:
        raise ValueError(
            f"{where}: the recorded arguments {', '.join(odd)} of {class_path} are not plain values "
            "(None, bool, number, string, or lists and mappings of those): export the set again"
        )
    accepted = accepted_arguments(cls)
    unknown = sorted(set(init_args) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"{where}: {cls.__name__} takes no argument {', '.join(unknown)} (recorded in the file); it takes "
            f"{', '.join(sorted(accepted or ()))}"
        )
    return cls, init_args


def get_datamodule(name: str, **kwargs: Any) -> RealDataModule:
    """Build the DataModule of a canonical dataset.

    Args:
        name: A key of :data:`DATASETS` (case and ``-``/``_`` do not matter; ``fmnist``, ``cifar-10`` also work).
        **kwargs: Passed to the DataModule (``root``, ``batch_size``, ``val_size``, ``zca``, ...).

    Returns:
        The DataModule (not set up yet).

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    key = canonical_name(name)
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}; "
            f"use ImageFolderDataModule or ArrayDataModule for your own data"
        )
    return DATASETS[key](**kwargs)


for _cls in (*DATASETS.values(), ArrayDataModule, ImageFolderDataModule, TinyImageNetDataModule):
    # Also under the public spelling a recipe uses (lightning_distill.data.MNISTDataModule).
    register_datamodule(_cls, f"{__name__}.{_cls.__name__}")
del _cls

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DATASET_STATS",
    "ArrayDataModule",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "ClassBalancedStream",
    "ClassSubsetStream",
    "DatasetNotFoundError",
    "DistilledDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageNet64DataModule",
    "MNISTDataModule",
    "Preprocessing",
    "RealBatchStream",
    "RealDataModule",
    "SVHNDataModule",
    "TinyImageNetDataModule",
    "ZCAFit",
    "accepted_arguments",
    "canonical_name",
    "check_datamodule_record",
    "class_path_of",
    "default_cache_dir",
    "default_data_root",
    "fit_zca",
    "fit_zca_kornia",
    "fit_zca_trace",
    "get_datamodule",
    "load_array_file",
    "register_datamodule",
    "registered_datamodules",
]
