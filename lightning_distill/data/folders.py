"""Image-file datasets: Tiny-ImageNet and a user's own ``train/<class>/*`` tree, decoded once into a cached ``.npz``."""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from lightning_distill.data.cache import DatasetNotFoundError, atomic_savez, cache_subdir, default_data_root, digest
from lightning_distill.data.constants import canonical_name
from lightning_distill.data.real import RealDataModule

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 moved the constants


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_images(
    files: list[Path], size: tuple[int, int] | None, mode: str, desc: str = "decoding images"
) -> np.ndarray:
    """Decode image files with PIL into one uint8 array ``(N, C, H, W)``, with a progress bar.

    Args:
        files: Image paths.
        size: ``(H, W)`` to resize every image to (bilinear, antialiased by PIL); None: all images must share a size.
        mode: PIL mode, ``"RGB"`` or ``"L"`` (grayscale and palette images are converted).
        desc: Progress-bar label.

    Returns:
        ``(N, C, H, W)`` uint8.
    """
    channels = 1 if mode == "L" else 3

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), _BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    if size is None and files:
        first = read(files[0])
        size = (first.shape[0], first.shape[1])
    height, width = size if size is not None else (0, 0)
    out = np.empty((len(files), channels, height, width), dtype=np.uint8)
    # PIL releases the GIL while decoding, so threads help without pickling images between processes.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = pool.map(read, files)
        for i, arr in enumerate(tqdm(decoded, total=len(files), desc=desc, unit="img", leave=False)):
            if arr.shape[:2] != (height, width):
                raise ValueError(
                    f"{files[i]} is {arr.shape[1]}x{arr.shape[0]} but earlier images are {width}x{height}: "
                    f"pass image_size to resize them all"
                )
            out[i] = arr.transpose(2, 0, 1)
    return out


def _file_key(files: list[Path], base: Path) -> list[tuple[str, int, int]]:
    # Names, sizes and mtimes: a changed, added or removed image invalidates the decoded cache.
    out = []
    for f in files:
        stat = f.stat()
        out.append((str(f.relative_to(base)), stat.st_size, stat.st_mtime_ns))
    return out


def _cached_decode(
    prefix: str, key: str, splits: dict[str, tuple[list[Path], list[int]]], size: tuple[int, int] | None, mode: str
) -> dict[str, np.ndarray]:
    """Decode ``{split: (files, labels)}`` once into ``cache/decoded/<prefix>-<key>.npz`` and read it back."""
    target = cache_subdir("decoded") / f"{prefix}-{key}.npz"
    if target.is_file():
        with np.load(target, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    arrays: dict[str, np.ndarray] = {}
    for split, (files, labels) in splits.items():
        arrays[f"x_{split}"] = decode_images(files, size, mode, desc=f"decoding {prefix} {split} (once)")
        arrays[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
    log.info("caching decoded %s images in %s", prefix, target)
    atomic_savez(target, **arrays)
    return arrays


class TinyImageNetDataModule(RealDataModule):
    """Tiny-ImageNet: 100,000 train images of 200 classes, 3×64×64; its labelled ``val`` split serves as the test split.

    Expects the standard ``root/tiny-imagenet-200`` layout (``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG``,
    ``val/val_annotations.txt``, optional ``words.txt``). Classes are the sorted wnids. The JPEGs are decoded once
    into a cached ``.npz`` in the cache folder. Arguments: see :class:`RealDataModule`.
    """

    name = "tiny_imagenet"
    image_shape = (3, 64, 64)
    folder_name = "tiny-imagenet-200"
    expected_path = "tiny-imagenet-200/train"

    def _folder(self) -> Path:
        root = self.resolve_root()
        folder = root / self.folder_name
        if not (folder / "train").is_dir():
            if not self.download:
                raise self.not_found(root)
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(root))
        return folder

    def _tiny_folder(self) -> Path:
        # Read without resolve_root's checks: the class list is asked for before the data must exist.
        root = Path(self.root).expanduser() if self.root is not None else default_data_root()
        return root / self.folder_name

    def _wnids(self) -> list[str] | None:
        train = self._tiny_folder() / "train"
        return sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else None

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """200, or the number of class folders found under ``train/``."""
        wnids = self._wnids()
        return len(wnids) if wnids else 200

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """First synonym of each wnid from ``words.txt`` (else the wnid itself); empty before the data is on disk."""
        wnids = self._wnids() or []
        words: dict[str, str] = {}
        words_file = self._tiny_folder() / "words.txt"
        if wnids and words_file.is_file():
            for line in words_file.read_text().splitlines():
                wnid, _, text = line.partition("\t")
                words[wnid] = text.split(",")[0].strip()
        return [words.get(w, w) for w in wnids]

    def _decoded(self) -> dict[str, np.ndarray]:
        if getattr(self, "_arrays", None) is None:
            folder = self._folder()
            wnids = self._wnids() or []
            index = {w: i for i, w in enumerate(wnids)}
            train_files: list[Path] = []
            train_labels: list[int] = []
            for wnid in wnids:
                files = sorted(p for p in (folder / "train" / wnid / "images").iterdir() if _is_image(p))
                train_files += files
                train_labels += [index[wnid]] * len(files)
            annotations = folder / "val" / "val_annotations.txt"
            if not annotations.is_file():
                raise DatasetNotFoundError(
                    f"{annotations} not found: the tiny-imagenet-200 folder is incomplete, download it again "
                    f"(download=True) or fix root"
                )
            test_files: list[Path] = []
            test_labels: list[int] = []
            for line in annotations.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 2:
                    continue
                if parts[1] not in index:
                    raise ValueError(f"{annotations}: wnid {parts[1]} of {parts[0]} has no train/ folder")
                test_files.append(folder / "val" / "images" / parts[0])
                test_labels.append(index[parts[1]])
            key = digest(str(folder.resolve()), wnids, _file_key(train_files + test_files, folder))
            splits = {"train": (train_files, train_labels), "test": (test_files, test_labels)}
            self._arrays = _cached_decode("tiny_imagenet", key, splits, None, "RGB")
        return self._arrays

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        arrays = self._decoded()
        return torch.from_numpy(arrays.pop(f"x_{split}")), torch.from_numpy(arrays.pop(f"y_{split}"))

    def prepare_data(self) -> None:
        """Download (``download=True``) and decode the JPEGs into the cache, on one process per node."""
        self.load_split("train")
        self.load_split("test")


class ImageFolderDataModule(RealDataModule):
    """A user's own images: ``path/train/<class>/*`` and ``path/test/<class>/*``, resized to ``image_size``.

    Classes are the sorted folder names under ``train/``. Images are decoded once (cached as ``.npz`` in the cache
    folder). Mean/std are computed from the training images unless given. A missing ``test/`` gives an empty test
    split with a warning.

    Args:
        path: Folder holding ``train/`` (and ``test/``).
        image_size: Output size: one int for square images, or ``[height, width]``.
        channels: 3 (RGB) or 1 (grayscale).
        name: Dataset name (cache file names and exported metadata).
        mean: Per-channel mean overriding the computed one (needs ``std`` too).
        std: Per-channel std.
        **kwargs: Forwarded to :class:`RealDataModule` (``batch_size``, ``val_size``, ``zca``, ``seed``, ...).
    """

    def __init__(
        self,
        path: str,
        image_size: int | list[int],
        channels: int = 3,
        name: str = "image_folder",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither")
        size = [image_size, image_size] if isinstance(image_size, int) else [int(s) for s in image_size]
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be a positive int or [height, width], got {image_size!r}")
        self.path = path
        self.size = (size[0], size[1])
        self.channels = channels
        self.name = canonical_name(name)
        self._mean, self._std = mean, std

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        """``(channels, height, width)``."""
        return (self.channels, *self.size)

    def _split_dir(self, split: str) -> Path:
        base = Path(self.path).expanduser()
        if not base.is_dir():
            raise DatasetNotFoundError(
                f"image folder {base} does not exist: pass path= a folder holding train/<class>/<image> "
                f"(and test/<class>/<image>)"
            )
        if not (base / "train").is_dir():
            raise DatasetNotFoundError(
                f"image folder {base} has no train/ folder: arrange the images as {base}/train/<class>/<image> "
                f"and {base}/test/<class>/<image>"
            )
        return base / split

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        """Sorted class folder names under ``train/``."""
        return sorted(p.name for p in self._split_dir("train").iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of class folders under ``train/``."""
        return len(self.class_names)

    def _load_raw(self, split: str) -> tuple[Tensor, Tensor]:
        folder = self._split_dir(split)
        classes = self.class_names
        if not folder.is_dir():
            warnings.warn(f"{folder} does not exist: the test split is empty", stacklevel=2)
            return torch.empty(0, *self.image_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise ValueError(f"{folder} has classes that train/ lacks: {', '.join(unknown)}")
        files: list[Path] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            class_dir = folder / cls
            found = sorted(p for p in class_dir.rglob("*") if p.is_file() and _is_image(p))
            # An empty class folder would silently train (or test) a class on nothing; a test/ folder may leave a
            # class out altogether, but a folder that is there and empty is a mistake either way.
            if not found and class_dir.is_dir():
                raise DatasetNotFoundError(
                    f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}): add the class's "
                    f"images there, or remove the folder (every sub-folder of {folder.parent / 'train'} is a class)"
                )
            files += found
            labels += [label] * len(found)
        if split == "train" and not files:
            raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}/<class>/")
        base = folder.parent
        key = digest(str(base.resolve()), split, self.size, self.channels, classes, _file_key(files, base))
        mode = "L" if self.channels == 1 else "RGB"
        arrays = _cached_decode(f"{self.name}-{split}", key, {split: (files, labels)}, self.size, mode)
        return torch.from_numpy(arrays[f"x_{split}"]), torch.from_numpy(arrays[f"y_{split}"])

    def normalization_stats(self, x_train_raw: Tensor) -> tuple[list[float], list[float]]:
        """The given mean/std, else computed from the training images."""
        if self._mean is not None and self._std is not None:
            return list(self._mean), list(self._std)
        return super().normalization_stats(x_train_raw)

    def prepare_data(self) -> None:
        """Decode the images into the cache once, on one process per node."""
        self.load_split("train")
        self.load_split("test")
