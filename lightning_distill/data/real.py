"""The base of every real-data DataModule: in-memory tensors, seeded val split, cached ZCA, endless batch stream."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill.data.cache import (
    DatasetNotFoundError,
    atomic_torch_save,
    cache_subdir,
    default_data_root,
    digest,
)
from lightning_distill.data.constants import DATASET_STATS
from lightning_distill.data.convert import channel_stats, to_labels, to_nchw_uint8
from lightning_distill.data.members import chunk_indices, complement
from lightning_distill.data.preprocess import (
    ZCA_CONVENTIONS,
    Preprocessing,
    ZCAFit,
    fit_zca_kornia,
    fit_zca_trace,
)
from lightning_distill.data.stream import ClassBalancedStream, RealBatchStream

log = logging.getLogger(__name__)

_CHUNK = 8192  # images per preprocessing chunk: bounds the float32 working memory


class RealDataModule(L.LightningDataModule):
    """Base of the real-data DataModules: the whole dataset as tensors, preprocessed once.

    After :meth:`setup`, ``x_train, y_train`` (on the training device), ``x_val, y_val`` and ``x_test, y_test`` (on the
    CPU) hold float32 images in model-input space and int64 labels, and ``preprocessing`` maps [0, 1] images there and
    back. The validation split is a seeded random subset held out of the training split; the test split is never used
    for selection. ZCA (if any) is fitted once on the remaining training images and cached on disk.

    Subclasses set ``name``, ``num_classes``, ``image_shape``, ``class_names`` (class attributes or properties) and
    write :meth:`_load_raw`.

    Args:
        root: Folder holding the dataset (torchvision layout). None: ``$LIGHTNING_DISTILL_DATA``, else
            ``~/.cache/lightning_distill/data`` (see :func:`default_data_root`).
        batch_size: Real images per batch of the endless training stream (the outer loop's real batch).
        val_size: Held-out validation images: a fraction in [0, 1) of the training split, or a count.
        normalize: Per-channel mean/std normalisation. None: True unless ``zca == "kornia"`` (MTT/APM apply kornia's
            ZCA to unnormalised [0, 1] images).
        zca: ZCA whitening convention: ``"none"``, ``"kornia"`` (MTT/APM, ``zca_reg`` is kornia's absolute ``eps``) or
            ``"trace"`` (KIP/FRePo/RCIG, regulariser ``zca_reg · tr(Σ)/d`` with rank control).
        zca_reg: ZCA regulariser of the chosen convention (0.1 in all four reference code bases).
        download: Download the dataset into ``root`` if it is missing (needs internet access).
        seed: Seed of the validation split and of the training batch stream (plus the global rank).
        device: Where the training tensor lives. None: the trainer's root device when attached, else the CPU.
        eval_batch_size: Batch size of the validation and test loaders. None: ``batch_size``.
        sampler: How real batches are drawn: ``uniform`` (seeded permutations of the whole training split) or
            ``balanced`` (``batch_size // num_classes`` images of every class per batch, each class walking its own
            permutation). Methods that need per-class or class-subset batches build a
            :class:`~lightning_distill.data.stream.ClassSubsetStream` on ``x_train``/``y_train`` themselves.
        member_chunk: Train on one chunk of the training split only (FRePo's membership-inference setting): chunk
            ``member_chunk`` (0-based) of ``member_chunk_size`` images becomes ``x_train``, and the validation split
            is held out of the other training images. ``member_indices`` then holds the chunk's indices into the raw
            training split (:meth:`load_split`), which exports record. None: the whole training split.
        member_chunk_size: Images per member chunk.
        member_seed: None cuts the chunks from the training split in its stored order (FRePo's ``chunk_idx``); an
            integer cuts them from a permutation drawn with that seed.
    """

    name: str = "real"
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: list[str]
    #: Folder (relative to ``root``) and file that must exist, used in the "not found" message.
    expected_path: str = ""

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 256,
        val_size: float | int = 0.1,
        normalize: bool | None = None,
        zca: Literal["none", "kornia", "trace"] = "none",
        zca_reg: float = 0.1,
        download: bool = False,
        seed: int = 0,
        device: str | None = None,
        eval_batch_size: int | None = None,
        sampler: Literal["uniform", "balanced"] = "uniform",
        member_chunk: int | None = None,
        member_chunk_size: int = 2000,
        member_seed: int | None = None,
    ) -> None:
        super().__init__()
        if sampler not in ("uniform", "balanced"):
            raise ValueError(f"sampler must be 'uniform' or 'balanced', got {sampler!r}")
        if zca not in ZCA_CONVENTIONS:
            raise ValueError(f"zca must be one of {', '.join(ZCA_CONVENTIONS)}, got {zca!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be positive, got batch_size={batch_size}, eval={eval_batch_size}")
        self.root = root
        self.batch_size = int(batch_size)
        self.val_size = self._check_val_size(val_size)
        self.normalize = (zca != "kornia") if normalize is None else bool(normalize)
        self.zca = zca
        self.zca_reg = float(zca_reg)
        self.download = bool(download)
        self.seed = int(seed)
        self.device = device
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.sampler = sampler
        if member_chunk is not None and (member_chunk < 0 or member_chunk_size < 1):
            raise ValueError(
                f"need member_chunk >= 0 and member_chunk_size >= 1, got {member_chunk} and {member_chunk_size}"
            )
        self.member_chunk = None if member_chunk is None else int(member_chunk)
        self.member_chunk_size = int(member_chunk_size)
        self.member_seed = None if member_seed is None else int(member_seed)
        self._raw: dict[str, tuple[Tensor, Tensor]] = {}
        self.preprocessing: Preprocessing | None = None
        self.x_train: Tensor | None = None
        self.y_train: Tensor | None = None
        self.x_val: Tensor | None = None
        self.y_val: Tensor | None = None
        self.x_test: Tensor | None = None
        self.y_test: Tensor | None = None
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        #: With ``member_chunk``: the members' indices into the raw training split (``train_indices``); else None.
        self.member_indices: Tensor | None = None
        # In-memory arrays are data, not hyperparameters: keep them out of checkpoints.
        self.save_hyperparameters(ignore=["x_train", "y_train", "x_test", "y_test"])

    # ----------------------------------------------------------------------------------------------- raw data

    @staticmethod
    def _check_val_size(val_size: float | int) -> float | int:
        bad = isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0
        if not bad and isinstance(val_size, float) and val_size >= 1:
            # Configs may turn the count 5000 into 5000.0 (float | int unions); an integral float >= 1 is a count.
            bad = not val_size.is_integer()
            val_size = int(val_size)
        if bad:
            raise ValueError(
                f"val_size must be a fraction in [0, 1) of the training split or a whole number of images, "
                f"got {val_size!r}: pass e.g. val_size=0.1 or val_size=5000"
            )
        return val_size

    def val_count(self, n_train: int) -> int:
        """How many of ``n_train`` training images the validation split takes."""
        n_val = round(self.val_size * n_train) if isinstance(self.val_size, float) else int(self.val_size)
        if n_val >= n_train:
            raise ValueError(
                f"val_size={self.val_size!r} leaves no training images ({self.name} has {n_train}): "
                f"pass a smaller val_size"
            )
        return n_val

    def resolve_root(self) -> Path:
        """The data root (``root``, else :func:`default_data_root`); created with ``download=True``, else checked."""
        root = Path(self.root).expanduser() if self.root is not None else default_data_root()
        if not root.is_dir():
            if self.download:
                root.mkdir(parents=True, exist_ok=True)
            else:
                raise DatasetNotFoundError(
                    f"data root {root} does not exist: set root (a recipe's data.init_args.root, evaluate's --root) or "
                    f"LIGHTNING_DISTILL_DATA to the folder that holds {self.name}, or pass download=True with internet "
                    "access to fetch it there"
                )
        return root

    def not_found(self, root: Path, expected: str | None = None) -> DatasetNotFoundError:
        """The one-line "not found" error for this dataset under ``root``."""
        expected_path = root / (expected or self.expected_path)
        return DatasetNotFoundError(
            f"{self.name} not found under {root} (expected {expected_path}): pass download=True with internet access, "
            "or set root (a recipe's data.init_args.root, evaluate's --root) or LIGHTNING_DISTILL_DATA to a folder "
            "that holds it"
        )

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        """Read ``split`` ("train" or "test") from disk as uint8 ``(N, C, H, W)`` and int64 labels."""
        raise NotImplementedError

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        """Raw ``(uint8 (N, C, H, W), int64 (N,))`` of ``split`` ("train" or "test"), read once and kept in memory."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._raw:
            x, y = self._load_raw(split)
            x, y = to_nchw_uint8(x, f"{self.name} {split} images"), to_labels(y, f"{self.name} {split} labels")
            if len(x) != len(y):
                raise ValueError(f"{self.name} {split}: {len(x)} images but {len(y)} labels")
            self._raw[split] = (x, y)
        return self._raw[split]

    def normalization_stats(self, x_train_raw: Tensor) -> tuple[list[float], list[float]]:
        """Per-channel mean/std: the published constants for canonical datasets, else computed from training images."""
        if self.name in DATASET_STATS:
            mean, std = DATASET_STATS[self.name]
            return list(mean), list(std)
        return channel_stats(x_train_raw)

    def prepare_data(self) -> None:
        """Download (``download=True``) on one process per node; reading happens in :meth:`setup`."""
        if self.download:
            self.load_split("train")
            self.load_split("test")

    # ----------------------------------------------------------------------------------------------- setup

    def _resolve_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    @staticmethod
    def _preprocess(raw: Tensor, prep: Preprocessing, compute: torch.device, out_device: torch.device) -> Tensor:
        """uint8 images -> float32 model-input space, in chunks on ``compute``, gathered on ``out_device``."""
        prep = prep.to(compute, torch.float32)
        out = torch.empty(raw.shape, dtype=torch.float32, device=out_device)
        for start in range(0, len(raw), _CHUNK):
            chunk = raw[start : start + _CHUNK].to(compute).float().div_(255.0)
            out[start : start + len(chunk)] = prep.apply(chunk).to(out_device)
        return out

    def _zca_cache_file(self, x_raw: Tensor, base: Preprocessing, n_val: int) -> Path:
        # The content hash keeps user datasets that share a name (ImageFolder, arrays) from sharing a cache entry.
        members = () if self.member_chunk is None else (self.member_chunk, self.member_chunk_size, self.member_seed)
        key = digest(self.name, self.zca, self.zca_reg, base.mean, base.std, self.seed, n_val, x_raw, *members)
        return cache_subdir("zca") / f"{self.name}_{self.zca}_reg{self.zca_reg:g}_seed{self.seed}_val{n_val}_{key}.pt"

    def _load_cached_zca(self, path: Path, d: int) -> ZCAFit | None:
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            fit = ZCAFit(state["matrix"], state["inverse"], state["mean"])
        except Exception as err:  # a corrupt or foreign file: refit rather than fail
            log.warning("ignoring unreadable ZCA cache %s (%s)", path, err)
            return None
        if fit.matrix.shape != (d, d) or fit.inverse.shape != (d, d) or fit.mean.shape != (d,):
            log.warning("ignoring ZCA cache %s with the wrong shape", path)
            return None
        return fit

    def _fit_zca(self, x: Tensor) -> ZCAFit:
        # Looked up as module globals so tests can check that a cached fit is reused.
        if self.zca == "trace":
            return fit_zca_trace(x, reg=self.zca_reg)
        return fit_zca_kornia(x, eps=self.zca_reg)

    def _split_indices(self, n: int, n_val: int) -> tuple[Tensor, Tensor]:
        """``(train, val)`` indices into the raw training split of ``n`` images, each sorted."""
        gen = torch.Generator().manual_seed(self.seed)
        if self.member_chunk is None:
            perm = torch.randperm(n, generator=gen)
            # Sorted so both parts keep the dataset's order; only membership is random.
            return perm[n_val:].sort().values, perm[:n_val].sort().values
        members = chunk_indices(n, self.member_chunk, self.member_chunk_size, self.member_seed)
        rest = complement(members, n)
        if n_val > len(rest):
            raise ValueError(
                f"val_size={self.val_size!r} asks for {n_val} validation images, but only {len(rest)} training images "
                f"lie outside member chunk {self.member_chunk}: pass a smaller val_size"
            )
        # Validation comes from the non-members, so no validation score counts an image the set was built from.
        return members, rest[torch.randperm(len(rest), generator=gen)[:n_val]].sort().values

    def setup(self, stage: str | None = None) -> None:
        """Read the data, split off validation, fit (or load) the preprocessing, build the model-input tensors.

        Runs once; later calls only move the training tensor to the training device if it changed.
        """
        device = self._resolve_device()
        if self.preprocessing is not None:
            self._move_train(device)
            return
        x_raw, y_raw = self.load_split("train")
        n_val = self.val_count(len(x_raw))
        self.train_indices, self.val_indices = self._split_indices(len(x_raw), n_val)
        self.member_indices = self.train_indices if self.member_chunk is not None else None
        x_train_raw = x_raw[self.train_indices]
        shape = tuple(x_train_raw.shape[1:])
        if self.normalize:
            mean, std = self.normalization_stats(x_train_raw)
            base = Preprocessing(mean=mean, std=std, image_shape=shape)
        else:
            base = Preprocessing.identity(shape)  # type: ignore[arg-type]
        prep = base
        if self.zca != "none":
            cache_file = self._zca_cache_file(x_raw, base, n_val)
            fit = self._load_cached_zca(cache_file, math.prod(shape))
            if fit is None:
                log.info(
                    "fitting %s ZCA on %d %s images (cached in %s)", self.zca, len(x_train_raw), self.name, cache_file
                )
                fit = self._fit_zca(self._preprocess(x_train_raw, base, device, device))
                fit = ZCAFit(*(t.detach().to("cpu", torch.float32).contiguous() for t in fit))
                atomic_torch_save(fit._asdict(), cache_file)
            prep = base.with_zca(self.zca, fit)
        self.preprocessing = prep
        cpu = torch.device("cpu")
        self.x_train = self._preprocess(x_train_raw, prep, device, device)
        self.y_train = y_raw[self.train_indices].to(device)
        self.x_val = self._preprocess(x_raw[self.val_indices], prep, device, cpu)
        self.y_val = y_raw[self.val_indices].clone()
        x_test_raw, y_test = self.load_split("test")
        self.x_test = self._preprocess(x_test_raw, prep, device, cpu)
        self.y_test = y_test.clone()

    def _move_train(self, device: torch.device) -> None:
        if self.x_train is not None and self.y_train is not None and self.x_train.device != device:
            self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)

    def _require_setup(self) -> None:
        if self.preprocessing is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run: call dm.setup() or pass it to a Trainer")

    # ----------------------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> RealBatchStream | ClassBalancedStream:
        """Endless seeded stream of ``(x_real, y_real)`` batches on the training device (seed + global rank)."""
        self._require_setup()
        self._move_train(self._resolve_device())
        rank = self.trainer.global_rank if self.trainer is not None else 0
        assert self.x_train is not None and self.y_train is not None
        # Under a Trainer the fit loop holds one prefetched batch when it checkpoints.
        lookahead = 1 if self.trainer is not None else 0
        if self.sampler == "balanced":
            return ClassBalancedStream(
                self.x_train,
                self.y_train,
                self.batch_size,
                self.seed + rank,
                lookahead=lookahead,
                num_classes=self.num_classes,
            )
        return RealBatchStream(self.x_train, self.y_train, self.batch_size, self.seed + rank, lookahead=lookahead)

    def val_dataloader(self) -> DataLoader:
        """The held-out validation split, in order."""
        self._require_setup()
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The test split, in order (for reporting only, never for selection)."""
        self._require_setup()
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=self.eval_batch_size, shuffle=False)
