"""File-based DataModules: ImageFolder and Tiny-ImageNet trees, array files (.npz / .npz.xz), offline CIFAR-10."""

from __future__ import annotations

import io
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_distill.data.arrays as arrays_module
import lightning_distill.data.folders as folders_module
from lightning_distill.data import (
    ArrayDataModule,
    DatasetNotFoundError,
    ImageFolderDataModule,
    TinyImageNetDataModule,
    get_datamodule,
)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_cache: Path) -> Path:
    return tmp_cache


def _write_image(path: Path, value: int, size: tuple[int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(value + rng.integers(-8, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _image_folder(root: Path) -> Path:
    # 3 classes of distinct brightness, odd sizes so resizing is exercised; a grayscale image among them.
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i in range(4):
            _write_image(root / "train" / cls / f"{i}.png", 40 + 80 * c, (10 + i, 12))
        for i in range(2):
            _write_image(root / "test" / cls / f"{i}.png", 40 + 80 * c, (12, 12))
    Image.new("L", (9, 9), 60).save(root / "train" / "cat" / "gray.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "pets")
    dm = ImageFolderDataModule(path=str(root), image_size=8, val_size=2, name="pets")
    assert dm.class_names == ["cat", "dog", "eel"] and dm.num_classes == 3 and dm.image_shape == (3, 8, 8)
    dm.setup()
    assert dm.x_train.shape == (11, 3, 8, 8) and dm.x_val.shape == (2, 3, 8, 8) and dm.x_test.shape == (6, 3, 8, 8)
    assert torch.bincount(dm.load_split("train")[1]).tolist() == [5, 4, 4]
    assert dm.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    # Mean/std computed from the training part: per channel, x_train is standardised.
    torch.testing.assert_close(dm.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(dm.x_train.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    # The decoded images are cached: a second module does not decode again.
    monkeypatch.setattr(folders_module, "decode_images", lambda *a, **k: pytest.fail("decoded twice"))
    again = ImageFolderDataModule(path=str(root), image_size=[8, 8], val_size=2, name="pets")
    again.setup()
    assert torch.equal(again.x_test, dm.x_test)


def test_image_folder_grayscale_and_missing_test(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    for c in range(2):
        for i in range(3):
            _write_image(root / "train" / str(c) / f"{i}.jpg", 50 + 100 * c, (6, 6), fmt="JPEG")
    dm = ImageFolderDataModule(path=str(root), image_size=[4, 5], channels=1, val_size=0)
    with pytest.warns(UserWarning, match="test split is empty"):
        dm.setup()
    assert dm.x_train.shape == (6, 1, 4, 5) and dm.x_test.shape == (0, 1, 4, 5)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist: pass path= a folder holding train/<class>"):
        ImageFolderDataModule(path=str(tmp_path / "nothing"), image_size=8).setup()
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"has no train/ folder: arrange the images as .*/train/<class>"):
        ImageFolderDataModule(path=str(tmp_path / "flat"), image_size=8).setup()
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataModule(path=str(tmp_path), image_size=[8])


def _tiny_imagenet(root: Path, wnids: list[str], per_class: int = 3) -> None:
    base = root / "tiny-imagenet-200"
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            _write_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 30 + 60 * c, (64, 64), fmt="JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for j, c in enumerate([2, 0, 1, 2]):
        name = f"val_{j}.JPEG"
        _write_image(base / "val" / "images" / name, 30 + 60 * c, (64, 64), fmt="JPEG")
        lines.append(f"{name}\t{wnids[c]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    words = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander", "n09999999": "x"}
    (base / "words.txt").write_text("".join(f"{w}\t{words[w]}\n" for w in wnids))


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    wnids = ["n09999999", "n01629819", "n01443537"]  # deliberately unsorted: classes are the sorted wnids
    _tiny_imagenet(tmp_path, wnids)
    dm = TinyImageNetDataModule(root=str(tmp_path), val_size=0, batch_size=4)
    assert dm.num_classes == 3 and dm.class_names == ["goldfish", "European fire salamander", "x"]
    dm.setup()
    assert dm.image_shape == (3, 64, 64) and dm.x_train.shape == (9, 3, 64, 64)
    assert dm.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # val_annotations order; wnids[2] = n01443537 is class 0 after sorting.
    assert dm.y_test.tolist() == [0, 2, 1, 0]
    assert dm.preprocessing.mean == [0.4759, 0.4481, 0.3926]
    # Each image's brightness (30 + 60 × its position in `wnids`) matches its annotated class.
    brightness = dm.load_split("test")[0].float().mean((1, 2, 3))
    torch.testing.assert_close(brightness, torch.tensor([150.0, 30.0, 90.0, 150.0]), atol=6, rtol=0)
    assert len(list((tmp_path / "cache" / "decoded").glob("tiny_imagenet-*.npz"))) == 1


def test_tiny_imagenet_missing(tmp_path: Path) -> None:
    dm = TinyImageNetDataModule(root=str(tmp_path))
    assert dm.num_classes == 200
    with pytest.raises(DatasetNotFoundError, match=r"tiny-imagenet-200/train\): pass download=True"):
        dm.setup()


def test_array_from_tensors_both_layouts() -> None:
    g = torch.Generator().manual_seed(0)
    nchw = torch.randint(0, 256, (30, 3, 5, 5), generator=g, dtype=torch.uint8)
    y = torch.arange(30) % 3
    a = ArrayDataModule(x_train=nchw, y_train=y, x_test=nchw[:6], y_test=y[:6], val_size=0.2, name="toy")
    b = ArrayDataModule(
        x_train=nchw.permute(0, 2, 3, 1).numpy(), y_train=y.numpy(), x_test=nchw[:6].permute(0, 2, 3, 1).numpy(),
        y_test=y[:6].tolist(), val_size=0.2, name="toy",
    )  # fmt: skip
    a.setup()
    b.setup()
    assert a.image_shape == (3, 5, 5) and a.num_classes == 3 and a.class_names == ["0", "1", "2"]
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val) and len(a.x_val) == 6
    gray = ArrayDataModule(x_train=nchw[:, 0], y_train=y, x_test=nchw[:4, 0], y_test=y[:4], classes=["a", "b", "c"])
    assert gray.image_shape == (1, 5, 5) and gray.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="needs path="):
        ArrayDataModule(x_train=nchw, y_train=y)
    with pytest.raises(TypeError, match="must be uint8"):
        ArrayDataModule(x_train=nchw.float(), y_train=y, x_test=nchw, y_test=y).setup()


def test_array_from_npz_xz_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
        "y_train": (np.arange(40) % 2).astype(np.uint8),
        "x_test": rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
        "y_test": (np.arange(10) % 2).astype(np.uint8),
        "classes": np.array(["left", "right"]),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    path = tmp_path / "toy.npz.xz"
    path.write_bytes(lzma.compress(buffer.getvalue()))
    dm = ArrayDataModule(path=str(path), val_size=0.25)
    dm.setup()
    assert dm.class_names == ["left", "right"] and dm.image_shape == (3, 8, 8) and dm.x_train.shape == (30, 3, 8, 8)
    assert torch.equal(dm.load_split("test")[0], torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2))
    assert dm.y_test.dtype == torch.int64
    assert len(list((tmp_path / "cache" / "arrays").glob("toy-*.npz"))) == 1
    # The second read uses the decompressed copy.
    monkeypatch.setattr(arrays_module.lzma, "open", lambda *a, **k: pytest.fail("decompressed twice"))
    again = ArrayDataModule(path=str(path), val_size=0.25)
    again.setup()
    assert torch.equal(again.x_val, dm.x_val)
    plain = tmp_path / "toy.npz"
    plain.write_bytes(buffer.getvalue())
    assert ArrayDataModule(path=str(plain)).num_classes == 2
    with pytest.raises(DatasetNotFoundError, match="pass path= an existing .npz"):
        ArrayDataModule(path=str(tmp_path / "missing.npz")).setup()


def _check_offline_cifar10(root: Path, per_class_train: int, per_class_test: int, val_size: int) -> None:
    path = root / "CIFAR10" / "cifar10.npz.xz"
    dm = ArrayDataModule(path=str(path), name="cifar10", val_size=val_size)
    dm.setup()
    n_train, n_test = 10 * per_class_train, 10 * per_class_test
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane" and dm.image_shape == (3, 32, 32)
    assert dm.x_train.shape == (n_train - val_size, 3, 32, 32) and dm.x_test.shape == (n_test, 3, 32, 32)
    assert dm.preprocessing.mean == [0.4914, 0.4822, 0.4465]
    assert torch.bincount(dm.load_split("train")[1]).tolist() == [per_class_train] * 10
    assert torch.bincount(dm.y_test).tolist() == [per_class_test] * 10
    # The registry's CIFAR10DataModule falls back to the same file when torchvision's batches are absent.
    tv = get_datamodule("cifar10", root=str(root), val_size=val_size)
    tv.setup()
    assert torch.equal(tv.x_val, dm.x_val) and torch.equal(tv.y_test, dm.y_test)


def test_offline_cifar10_fixture(fixture_root: Path) -> None:
    # The shipped fixture: the first 30 training and 10 test images of each class, in the same file format.
    _check_offline_cifar10(fixture_root, per_class_train=30, per_class_test=10, val_size=50)


@pytest.mark.slow
@pytest.mark.full_data
def test_offline_cifar10(full_data_root: Path) -> None:
    _check_offline_cifar10(full_data_root, per_class_train=5000, per_class_test=1000, val_size=5000)
