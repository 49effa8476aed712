"""A pool of teachers: registry networks trained once on the real training data, cached, reused across runs.

APM (and any method that matches a trained network's predictions) needs converged networks of the real data. They
are trained here by ordinary Lightning training (SGD, DSA augmentation, cross-entropy), the checkpoint of each kept
by its accuracy on the **validation** split held out of train (never the test split, which APM's own code used), and
written one file per teacher with the provenance that makes it valid: dataset and a fingerprint of its training
split, preprocessing, class count, image shape, architecture and training recipe.

The cache is keyed by that provenance (``$LIGHTNING_DISTILL_CACHE/teachers/<dataset>_<arch>_<key>/``), so a second
run with the same data and recipe trains nothing. A pool that does not match the run (another dataset, another
preprocessing, another class count...) is refused with one line saying how to build the right one; files are
written atomically, read with ``torch.load(weights_only=True)``, and never overwritten.

    spec = TeacherSpec(arch="convnet", num_teachers=5, epochs=50)
    pool = load_teacher_pool(datamodule, spec)            # trains what is missing, then loads
    logits = pool.net(0, device)(x)                       # teacher 0, eval mode, frozen
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.data.cache import cache_subdir, digest
from lightning_distill.io import atomic_path
from lightning_distill.nets import get_net, seeded_net

log = logging.getLogger(__name__)

__all__ = [
    "TEACHER_FORMAT",
    "TeacherPool",
    "TeacherPoolError",
    "TeacherSpec",
    "load_teacher_pool",
    "pool_folder",
    "pool_provenance",
    "train_teacher",
]

#: Version of the teacher file format.
TEACHER_FORMAT = 1
#: Provenance fields compared between a pool and a run, with how a mismatch is named in the refusal.
_MATCHED = {
    "dataset": "dataset",
    "num_classes": "class count",
    "image_shape": "image shape",
    "preprocessing": "preprocessing",
    "data": "training split",
    "arch": "architecture",
    "arch_kwargs": "architecture options",
    "recipe": "training recipe",
}


class TeacherPoolError(ValueError):
    """A teacher pool that is missing or does not match the run (the message says how to build the right one)."""


@dataclass
class TeacherSpec:
    """How a pool of teachers is trained; every field is part of the pool's cache key.

    Defaults are APM's teacher script (``model_train/train.py``): 100 ConvNets, SGD lr 0.05, momentum 0.9, weight
    decay 5e-4, batch 256, lr x0.1 at epoch 50, DSA augmentation, 100 epochs (README); the checkpoint is chosen on the
    validation split here, on the test split there.

    Args:
        arch: registry network (the students' and the ``dc`` protocol's ``convnet`` by default).
        arch_kwargs: its options (e.g. ``{"width": 32}`` for a CPU budget).
        num_teachers: networks in the pool (each seeded by ``seed + index``).
        epochs: training epochs over the training split.
        lr: SGD learning rate; ``momentum`` and ``weight_decay`` its settings.
        lr_drop_epoch: the learning rate is multiplied by 0.1 from this (0-based) epoch on; ``None``: ``epochs // 2``.
        batch_size: images per step.
        augment: ``dsa`` (per-image DSA, no flips for digits) or ``none``.
        seed: teacher ``i`` is initialised, shuffled and augmented from ``seed + i``.
    """

    arch: str = "convnet"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    num_teachers: int = 100
    epochs: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drop_epoch: int | None = None
    batch_size: int = 256
    augment: Literal["dsa", "none"] = "dsa"
    seed: int = 0

    def __post_init__(self) -> None:
        self.arch_kwargs = dict(self.arch_kwargs or {})
        for name in ("num_teachers", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"teachers.{name} must be a positive integer, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"teachers.lr must be positive, got {self.lr}")
        if self.augment not in ("dsa", "none"):
            raise ValueError(f"teachers.augment must be 'dsa' or 'none', got {self.augment!r}")
        if self.lr_drop_epoch is not None and self.lr_drop_epoch < 0:
            raise ValueError(f"teachers.lr_drop_epoch must be >= 0 or null, got {self.lr_drop_epoch}")

    @property
    def drop_epoch(self) -> int:
        """The (0-based) epoch from which the learning rate is 0.1x."""
        return self.epochs // 2 if self.lr_drop_epoch is None else self.lr_drop_epoch

    def recipe(self) -> dict[str, Any]:
        """The training settings that decide what a teacher is (part of the key; the count is not)."""
        d = asdict(self)
        for k in ("arch", "arch_kwargs", "num_teachers"):
            d.pop(k)
        d["lr_drop_epoch"] = self.drop_epoch
        return d


# ----------------------------------------------------------------------------------------------------- provenance
def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    return v


def _preprocessing_key(prep: Any) -> str:
    d = prep.to_dict() if hasattr(prep, "to_dict") else dict(prep or {})
    # The ZCA matrices enter through their bytes; mean, std and the convention by value.
    return digest(*(d.get(k) for k in ("mean", "std", "zca", "zca_matrix", "zca_mean", "image_shape")))


def _data_fingerprint(datamodule: Any) -> str:
    """A digest of the training split the teachers learn from and the validation split that selects them.

    Labels and split indices enter whole; images through an evenly strided sample of at most 4096 (a full hash of
    ImageNet would take a minute; a different dataset under the same name differs in the sample).
    """
    x_raw, y_raw = datamodule.load_split("train")
    train_idx = getattr(datamodule, "train_indices", None)
    val_idx = getattr(datamodule, "val_indices", None)
    train_idx = torch.arange(len(x_raw)) if train_idx is None else train_idx
    stride = max(1, len(train_idx) // 4096)
    sample = x_raw[train_idx[::stride]]
    return digest(tuple(x_raw.shape), y_raw[train_idx], train_idx, val_idx, sample)


def pool_provenance(datamodule: Any, spec: TeacherSpec) -> dict[str, Any]:
    """What a pool must have been trained on and how, for ``datamodule`` (set up) and ``spec``: plain values.

    Raises:
        RuntimeError: when the DataModule has not been set up (it has no preprocessing yet).
    """
    prep = getattr(datamodule, "preprocessing", None)
    if prep is None:
        raise RuntimeError("set the DataModule up (dm.setup('fit')) before asking for its teacher pool")
    return {
        "dataset": str(getattr(datamodule, "name", type(datamodule).__name__)),
        "num_classes": int(datamodule.num_classes),
        "image_shape": [int(s) for s in datamodule.image_shape],
        "preprocessing": _preprocessing_key(prep),
        "preprocessing_desc": _describe_preprocessing(prep),
        "data": _data_fingerprint(datamodule),
        "num_train": int(len(datamodule.x_train)),
        "num_val": int(0 if datamodule.x_val is None else len(datamodule.x_val)),
        "arch": spec.arch,
        "arch_kwargs": _plain(spec.arch_kwargs),
        "recipe": _plain(spec.recipe()),
    }


def _describe_preprocessing(prep: Any) -> str:
    d = prep.to_dict() if hasattr(prep, "to_dict") else dict(prep or {})
    identity = all(m == 0 for m in d.get("mean", [])) and all(s == 1 for s in d.get("std", []))
    norm = "identity" if identity else "mean/std"
    return f"{norm}, zca={d.get('zca', 'none')}"


def _key(provenance: Mapping[str, Any]) -> str:
    return digest(*(repr(provenance[k]) for k in _MATCHED))


def pool_folder(provenance: Mapping[str, Any], root: str | Path | None = None) -> Path:
    """Where the pool with ``provenance`` lives: ``<root or cache>/teachers/<dataset>_<arch>_<key>``."""
    base = Path(root).expanduser() if root is not None else cache_subdir("teachers")
    return base / f"{provenance['dataset']}_{provenance['arch']}_{_key(provenance)}"


def _mismatches(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    out = []
    for k, name in _MATCHED.items():
        if found.get(k) != wanted.get(k):
            if k == "preprocessing":
                pool, run = found.get("preprocessing_desc"), wanted.get("preprocessing_desc")
                out.append(f"another {name} ({pool}, this run: {run})")
            elif k == "data":
                pool, run = found.get("num_train"), wanted.get("num_train")
                out.append(f"another {name} ({pool} training images, this run: {run})")
            else:
                out.append(f"{name} {found.get(k)!r} instead of {wanted.get(k)!r}")
    return out


# ------------------------------------------------------------------------------------------------------ the pool
class TeacherPool:
    """Trained teachers of one architecture, held as state dicts over one template network.

    Args:
        template: a network of the teachers' architecture (its values are not used).
        states: one state dict per teacher.
        records: one record per teacher (validation accuracy, chosen epoch, test accuracy for reporting, seconds).
        provenance: what the pool was trained on and how (:func:`pool_provenance`).
        folder: where it was read from.
    """

    def __init__(
        self,
        template: nn.Module,
        states: list[dict[str, Tensor]],
        records: list[dict[str, Any]],
        provenance: dict[str, Any],
        folder: Path | None = None,
    ) -> None:
        if not states:
            raise ValueError("a teacher pool needs at least one teacher")
        self.template = template.eval()
        self.states = states
        self.records = records
        self.provenance = provenance
        self.folder = folder
        self._nets: dict[tuple[int, str], nn.Module] = {}

    def __len__(self) -> int:
        return len(self.states)

    @classmethod
    def untrained(
        cls, spec: TeacherSpec, in_channels: int, num_classes: int, image_size: int, count: int | None = None
    ) -> TeacherPool:
        """Freshly initialised (seeded) teachers of ``spec``'s architecture: for speed and memory measurements only
        (time and memory do not depend on the weights), never for distillation."""

        def build() -> nn.Module:
            return get_net(spec.arch, in_channels, num_classes, image_size, **spec.arch_kwargs)

        n = spec.num_teachers if count is None else count
        states = [seeded_net(build, spec.seed + i).state_dict() for i in range(n)]
        records = [{"index": i, "seed": spec.seed + i, "untrained": True} for i in range(n)]
        return cls(build(), states, records, {"arch": spec.arch, "arch_kwargs": spec.arch_kwargs, "untrained": True})

    def net(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Teacher ``index`` as a frozen network in eval mode on ``device`` (built once per device, then reused)."""
        if not 0 <= index < len(self.states):
            raise IndexError(f"teacher {index} out of range for a pool of {len(self.states)}")
        key = (index, str(torch.device(device)))
        if key not in self._nets:
            net = copy.deepcopy(self.template)
            net.load_state_dict(self.states[index])
            net.requires_grad_(False)
            self._nets[key] = net.to(device).eval()
        return self._nets[key]

    @torch.no_grad()
    def logits(self, index: int, x: Tensor, chunk_size: int = 1024, device: torch.device | str | None = None) -> Tensor:
        """Teacher ``index``'s logits of ``x`` (detached), computed in chunks on ``device`` (default ``x``'s)."""
        device = torch.device(device) if device is not None else x.device
        net = self.net(index, device)
        out = [net(x[i : i + chunk_size].to(device)).to(x.device) for i in range(0, len(x), chunk_size)]
        return torch.cat(out)

    def summary(self) -> dict[str, Any]:
        """Mean validation and test accuracies (test: reported only, never used to choose), and training time."""

        def mean(key: str) -> float | None:
            vals = [r[key] for r in self.records if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        return {
            "teachers": len(self),
            "val_acc": mean("val_acc"),
            "test_acc": mean("test_acc"),
            "test_accs": [r.get("test_acc") for r in self.records],
            "seconds": sum(r.get("seconds", 0.0) for r in self.records),
            "folder": None if self.folder is None else str(self.folder),
            "arch": self.provenance.get("arch"),
            "arch_kwargs": self.provenance.get("arch_kwargs"),
        }


# -------------------------------------------------------------------------------------------------- training
def _teacher_module(net: nn.Module, spec: TeacherSpec, augment: nn.Module, generator: torch.Generator) -> Any:
    import lightning as L

    class TeacherTraining(L.LightningModule):
        """Cross-entropy on augmented real batches; keeps the state with the best validation accuracy."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.augment = augment
            self.best_acc, self.best_epoch, self.best_state = -1.0, -1, None
            self._hits = self._seen = 0

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(self.augment(x, generator=generator)), y)
            self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(x))
            return loss

        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            x, y = batch
            self._hits += int((self.net(x).argmax(1) == y).sum())
            self._seen += len(y)

        def on_validation_epoch_end(self) -> None:
            acc = 100.0 * self._hits / max(1, self._seen)
            self._hits = self._seen = 0
            self.log("val_acc", acc, prog_bar=True)
            if acc > self.best_acc:  # strictly better: ties keep the earlier epoch
                self.best_acc, self.best_epoch = acc, self.current_epoch
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(
                self.net.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
            )
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[spec.drop_epoch], gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    return TeacherTraining()


class _NoAugment(nn.Module):
    """The identity, called like the augmentations."""

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x


def _loader(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None) -> Any:
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

    # Whole batches by tensor indexing (one __getitem__ per batch, not per image): the data are in memory already.
    inner = RandomSampler(range(len(x)), generator=generator) if generator is not None else SequentialSampler(x)
    sampler = BatchSampler(inner, batch_size=min(batch_size, len(x)), drop_last=False)
    return DataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)


def _trainer_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"accelerator": "cuda", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def train_teacher(
    datamodule: Any,
    spec: TeacherSpec,
    index: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    report_test: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train teacher ``index`` of ``spec`` on ``datamodule``'s training split with a Lightning ``Trainer``.

    The state kept is the one with the best accuracy on the validation split (the last epoch when the DataModule
    holds no validation images). The test accuracy of that state is recorded for reporting only.

    Returns:
        ``(state_dict on the CPU, record)``.
    """
    import lightning as L

    from lightning_distill.augment import DSA
    from lightning_distill.eval.protocols import NO_FLIP_DATASETS
    from lightning_distill.eval.train import test_accuracy

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed = spec.seed + index
    c, h, _ = datamodule.image_shape
    k = int(datamodule.num_classes)
    net = seeded_net(lambda: get_net(spec.arch, c, k, h, **spec.arch_kwargs), seed)
    flip = getattr(datamodule, "name", "") not in NO_FLIP_DATASETS
    if spec.augment == "dsa":
        # DSA as in training on real data: per-image parameters, one op group per batch; no flips for digits.
        augment: nn.Module = DSA(
            "color_crop_cutout_flip_scale_rotate" if flip else "color_crop_cutout_scale_rotate", batchwise=False
        )
    else:
        augment = _NoAugment()
    aug_gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator().manual_seed(seed + (1 << 32))
    module = _teacher_module(net, spec, augment, aug_gen)
    x_val, y_val = datamodule.x_val, datamodule.y_val
    has_val = x_val is not None and len(x_val) > 0
    start = time.perf_counter()
    with warnings.catch_warnings():
        # In-memory tensors need no workers, and the epoch-level scheduler is what APM uses.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LightningModule.*has parameters that were not used.*")
        trainer = L.Trainer(
            max_epochs=spec.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if has_val else 0,
            **_trainer_device(device),
        )
        trainer.fit(
            module,
            train_dataloaders=_loader(datamodule.x_train, datamodule.y_train, spec.batch_size, data_gen),
            val_dataloaders=_loader(x_val, y_val, 1024, None) if has_val else None,
        )
    seconds = time.perf_counter() - start
    if module.best_state is None:  # no validation split: the final state
        module.best_state = {k_: v.detach().to("cpu", copy=True) for k_, v in net.state_dict().items()}
        module.best_epoch = spec.epochs - 1
    record: dict[str, Any] = {
        "index": index,
        "seed": seed,
        "val_acc": module.best_acc if has_val else None,
        "best_epoch": module.best_epoch,
        "epochs": spec.epochs,
        "seconds": seconds,
        "test_acc": None,
    }
    if report_test and getattr(datamodule, "x_test", None) is not None:
        net.load_state_dict(module.best_state)
        net.to(device)
        record["test_acc"] = test_accuracy(net, datamodule.x_test.to(device), datamodule.y_test.to(device), k)
    return module.best_state, record


# ----------------------------------------------------------------------------------------------- load / build
def _file(folder: Path, index: int) -> Path:
    return folder / f"teacher_{index:03d}.pt"


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file
        raise TeacherPoolError(
            f"{path} is not a readable teacher file ({type(e).__name__}): delete it and build the pool again "
            "(lightning-distill teachers --config RECIPE)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != TEACHER_FORMAT or "state_dict" not in payload:
        raise TeacherPoolError(f"{path} is not a lightning-distill teacher file (format {TEACHER_FORMAT})")
    return payload


def _refusal(folder: Path, what: list[str], how: str) -> TeacherPoolError:
    return TeacherPoolError(f"the teacher pool in {folder} does not fit this run ({'; '.join(what)}): {how}")


def load_teacher_pool(
    datamodule: Any,
    spec: TeacherSpec,
    folder: str | Path | None = None,
    build: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
    how_to_build: str = "lightning-distill teachers --config RECIPE",
) -> TeacherPool:
    """The pool of ``spec.num_teachers`` teachers for ``datamodule``: read from ``folder``, training what is missing.

    Args:
        datamodule: a set-up real DataModule.
        spec: the teachers' architecture and training recipe.
        folder: the pool's folder; ``None``: the cache folder keyed by the provenance (:func:`pool_folder`).
        build: train missing teachers (and write them); ``False`` refuses a missing pool instead.
        device: where teachers train (default: CUDA when available).
        progress: Lightning's progress bar while a teacher trains, and a line per teacher.
        how_to_build: the command a refusal names (e.g. ``lightning-distill teachers --config recipes/apm/x.yaml``).

    Raises:
        TeacherPoolError: a pool that was trained on other data, preprocessing, classes or with another recipe, an
            unreadable file, or (``build=False``) missing teachers; one line naming what differs and how to fix it.
    """
    wanted = pool_provenance(datamodule, spec)
    folder = Path(folder).expanduser() if folder is not None else pool_folder(wanted)
    states: list[dict[str, Tensor]] = []
    records: list[dict[str, Any]] = []
    missing = [i for i in range(spec.num_teachers) if not _file(folder, i).is_file()]
    if missing and not build:
        have = spec.num_teachers - len(missing)
        raise TeacherPoolError(
            f"no complete teacher pool for {wanted['dataset']} ({wanted['preprocessing_desc']}, {spec.arch} "
            f"{spec.arch_kwargs or ''}) in {folder}: {have} of {spec.num_teachers} teachers there; build it first with "
            f"`{how_to_build}` (or set build_teachers: true to train it on first use)"
        )
    # Refuse a foreign pool before training anything into its folder.
    present = [i for i in range(spec.num_teachers) if i not in missing]
    if present:
        found = _read(_file(folder, present[0]))["provenance"]
        diff = _mismatches(found, wanted)
        if diff:
            raise _refusal(folder, diff, f"build the right one with `{how_to_build}`, or point teacher_dir elsewhere")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for i in range(spec.num_teachers):
        path = _file(folder, i)
        if path.is_file():
            payload = _read(path)
            diff = _mismatches(payload["provenance"], wanted)
            if diff:
                raise _refusal(folder, diff, f"delete {path.name} or rebuild the pool with `{how_to_build}`")
        else:
            if progress:
                print(f"teacher {i + 1}/{spec.num_teachers} ({spec.arch}, {spec.epochs} epochs) -> {path}", flush=True)
            log.info("training teacher %d/%d into %s", i + 1, spec.num_teachers, folder)
            state, record = train_teacher(datamodule, spec, i, dev, progress=progress)
            payload = {"format": TEACHER_FORMAT, "state_dict": state, "record": record, "provenance": wanted}
            if path.is_file():
                # Another process wrote the same teacher meanwhile: keep its file, never overwrite.
                payload = _read(path)
            else:
                with atomic_path(path) as tmp:
                    torch.save(payload, tmp)
            if progress:
                r = payload["record"]
                val = "-" if r.get("val_acc") is None else f"{r['val_acc']:.2f}"
                test = "-" if r.get("test_acc") is None else f"{r['test_acc']:.2f}"
                print(f"  val {val} % (epoch {r['best_epoch']}), test {test} % (reported only), {r['seconds']:.0f} s")
        states.append(payload["state_dict"])
        records.append(payload["record"])
    c, h, _ = datamodule.image_shape
    template = get_net(spec.arch, c, int(datamodule.num_classes), h, **spec.arch_kwargs)
    try:
        template.load_state_dict(states[0])
    except RuntimeError as e:
        what = [f"weights of another shape ({str(e).splitlines()[0][:80]})"]
        raise _refusal(folder, what, f"rebuild the pool with `{how_to_build}`") from None
    return TeacherPool(template, states, records, wanted, folder)


def teacher_seconds(records: list[dict[str, Any]]) -> float:
    """Total training time of the teachers in ``records`` (what a pool cost, reported apart from distillation)."""
    return float(sum(r.get("seconds", 0.0) for r in records if math.isfinite(r.get("seconds", 0.0))))
