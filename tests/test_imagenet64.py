"""Downsampled ImageNet-1K (64 px): the published npz batch format, read from tiny generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_distill.data import DATASETS, DatasetNotFoundError, ImageNet64DataModule, get_datamodule


def _write(folder: Path, name: str, n: int, seed: int, labels: np.ndarray | None = None) -> tuple:
    """A file as published: ``data`` uint8 rows (R plane, G plane, B plane, each row-major), 1-based ``labels``."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3 * 64 * 64), dtype=np.uint8)
    labels = rng.integers(1, 1001, size=n) if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    # The published train batches also carry the mean image; the reader must ignore extra keys.
    np.savez(folder / name, data=data, labels=labels.tolist(), mean=data.mean(0))
    return data, labels


@pytest.fixture
def imagenet64_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    # As the zips unpack: train parts in their own sub-folders, val beside them.
    b1 = _write(root / "imagenet64" / "Imagenet64_train_part1_npz", "train_data_batch_1.npz", 30, 1)
    b2 = _write(root / "imagenet64" / "Imagenet64_train_part2_npz", "train_data_batch_2.npz", 20, 2)
    val = _write(root / "imagenet64", "val_data.npz", 10, 3)
    return root, {"b1": b1, "b2": b2, "val": val}


def test_reads_the_published_layout_as_chw_with_zero_based_labels(imagenet64_root):
    root, files = imagenet64_root
    dm = ImageNet64DataModule(root=str(root), train_batches=[1, 2], val_size=5)
    x, y = dm.load_split("train")
    assert x.shape == (50, 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    data, labels = files["b1"]
    # Pixel (c, i, j) of image n is data[n, c*4096 + i*64 + j]: channel-major rows.
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 63, 62)]:
        assert int(x[3, c, i, j]) == int(data[3, c * 4096 + i * 64 + j])
    assert torch.equal(y[:30], torch.from_numpy(labels - 1))
    x_te, y_te = dm.load_split("test")
    assert x_te.shape == (10, 3, 64, 64) and torch.equal(y_te, torch.from_numpy(files["val"][1] - 1))
    dm.setup("fit")
    assert dm.x_train.shape == (45, 3, 64, 64) and dm.x_val.shape == (5, 3, 64, 64)
    assert dm.num_classes == 1000 and dm.preprocessing.mean == [0.485, 0.456, 0.406]
    assert DATASETS["imagenet64"] is ImageNet64DataModule and isinstance(get_datamodule("imagenet64"), type(dm))


def test_subsets_by_batch_and_per_class(imagenet64_root):
    root, files = imagenet64_root
    x, y = ImageNet64DataModule(root=str(root), train_batches=[2]).load_split("train")
    assert len(x) == 20 and torch.equal(y, torch.from_numpy(files["b2"][1] - 1))
    _, y1 = ImageNet64DataModule(root=str(root), train_batches=[1, 2], max_per_class=1).load_split("train")
    assert len(y1) == len(np.unique(np.concatenate([files["b1"][1], files["b2"][1]])))


def test_bad_files_and_missing_batches_are_refused_in_one_line(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError, match="train_data_batch_1.npz not found under .*unpack the published"):
        ImageNet64DataModule(root=str(root.parent), folder="data").load_split("train")
    _write(root / "imagenet64", "train_data_batch_1.npz", 4, 0, labels=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="1-based class ids 1..1000, got 0..3"):
        ImageNet64DataModule(root=str(root), train_batches=[1]).load_split("train")
    with pytest.raises(ValueError, match="train_batches must name some of the batches 1..10"):
        ImageNet64DataModule(root=str(root), train_batches=[11])
