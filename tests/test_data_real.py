"""Real DataModules: MNIST / Fashion-MNIST from the offline root, val split, batch stream, ZCA cache, errors.

The MNIST / Fashion-MNIST checks run on the shipped fixture (always) and on the full data (``full_data``: only with
``LIGHTNING_DISTILL_DATA`` pointing at it), each against that root's own exact counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_distill.data.real as real_module
from lightning_distill.data import (
    DATASETS,
    ArrayDataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    MNISTDataModule,
    RealDataModule,
    get_datamodule,
)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_cache: Path) -> Path:
    return tmp_cache


# What each root holds: train / test sizes and the test label counts (classes 0..9). The fixture is the first 3000 /
# 1000 images of the official files (tests/fixtures/README.md); the full counts are the published ones.
EXPECTED = {
    "fixture": {
        "n_train": 3000,
        "n_test": 1000,
        "mnist_test_counts": [85, 126, 116, 107, 110, 87, 87, 99, 89, 94],
        "fashion_test_counts": [107, 105, 111, 93, 115, 87, 97, 95, 95, 95],
    },
    "full": {
        "n_train": 60000,
        "n_test": 10000,
        "mnist_test_counts": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
        "fashion_test_counts": [1000] * 10,
    },
}


@pytest.fixture(scope="module", params=["fixture", pytest.param("full", marks=pytest.mark.full_data)])
def real(request: pytest.FixtureRequest) -> tuple[Path, dict]:
    """(root, expected counts) for the shipped fixture and, when available, the full data."""
    root = request.getfixturevalue("fixture_root" if request.param == "fixture" else "full_data_root")
    return root, EXPECTED[request.param]


@pytest.fixture(scope="module")
def mnist(real: tuple[Path, dict]) -> MNISTDataModule:
    dm = MNISTDataModule(root=str(real[0]), val_size=0.1, batch_size=64)
    dm.setup()
    return dm


def _tiny_arrays(n: int = 120, seed: int = 0, shape: tuple[int, ...] = (3, 6, 6)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x_train": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
        "y_train": torch.arange(n) % 4,
        "x_test": torch.randint(0, 256, (20, *shape), generator=g, dtype=torch.uint8),
        "y_test": torch.arange(20) % 4,
    }


def test_mnist_shapes_and_classes(mnist: MNISTDataModule, real: tuple[Path, dict]) -> None:
    n, n_test = real[1]["n_train"], real[1]["n_test"]
    assert mnist.name == "mnist" and mnist.num_classes == 10 and mnist.image_shape == (1, 28, 28)
    assert mnist.class_names == [str(i) for i in range(10)]
    assert mnist.x_train.shape == (n - n // 10, 1, 28, 28) and mnist.x_val.shape == (n // 10, 1, 28, 28)
    assert mnist.x_test.shape == (n_test, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.x_train.device.type == "cpu"
    assert mnist.preprocessing.mean == [0.1307] and mnist.preprocessing.zca == "none"
    # Normalised with the published constants: roughly zero mean, unit std.
    assert abs(mnist.x_train.mean().item()) < 0.01 and abs(mnist.x_train.std().item() - 1) < 0.01
    assert torch.bincount(mnist.y_test).tolist() == real[1]["mnist_test_counts"]
    x_raw, y_raw = mnist.load_split("train")
    assert x_raw.dtype == torch.uint8 and x_raw.shape == (n, 1, 28, 28) and y_raw.dtype == torch.int64
    assert mnist.load_split("train")[0] is x_raw  # read once, kept in memory


def test_fashion_mnist_loads(real: tuple[Path, dict]) -> None:
    root, expected = real
    dm = FashionMNISTDataModule(root=str(root), val_size=1000)
    dm.setup()
    assert dm.x_train.shape == (expected["n_train"] - 1000, 1, 28, 28) and dm.x_val.shape == (1000, 1, 28, 28)
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[-1] == "Ankle boot"
    assert torch.bincount(dm.y_test).tolist() == expected["fashion_test_counts"]
    assert dm.preprocessing.mean == [0.2861] and dm.preprocessing.std == [0.3530]


def test_val_split_seeded_disjoint_reproducible(mnist: MNISTDataModule, real: tuple[Path, dict]) -> None:
    root, n = real[0], real[1]["n_train"]
    train_idx, val_idx = mnist.train_indices, mnist.val_indices
    assert len(val_idx) == n // 10 and len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(n))
    x_raw, _ = mnist.load_split("train")
    torch.testing.assert_close(mnist.preprocessing.apply(x_raw[val_idx[:5]].float() / 255), mnist.x_val[:5])
    same = MNISTDataModule(root=str(root), val_size=0.1, seed=0)
    same.setup()
    assert torch.equal(same.val_indices, val_idx) and torch.equal(same.x_val, mnist.x_val)
    other = MNISTDataModule(root=str(root), val_size=0.1, seed=1)
    other.setup()
    assert not torch.equal(other.val_indices, val_idx)


def test_batch_stream_seeded_and_sized(mnist: MNISTDataModule) -> None:
    a, b = iter(mnist.train_dataloader()), iter(mnist.train_dataloader())
    batches_a = [next(a) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(batches_a, (next(b) for _ in range(3)), strict=True):
        assert xa.shape == (64, 1, 28, 28) and ya.shape == (64,)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(batches_a[0][1], batches_a[1][1])
    mnist.seed = 1
    try:
        xc, _ = next(iter(mnist.train_dataloader()))
    finally:
        mnist.seed = 0
    assert not torch.equal(xc, batches_a[0][0])


def test_batch_stream_covers_data_and_resumes() -> None:
    dm = ArrayDataModule(**_tiny_arrays(n=10), val_size=0, batch_size=4, seed=3)
    dm.setup()
    stream = dm.train_dataloader()
    idx = torch.cat([stream.next_indices() for _ in range(5)])  # 20 = two passes
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    # The global RNG plays no part.
    torch.manual_seed(123)
    first = dm.train_dataloader().next_indices()
    torch.manual_seed(456)
    assert torch.equal(first, dm.train_dataloader().next_indices())
    # Resume: a fresh stream loaded from a state continues identically.
    s1 = dm.train_dataloader()
    next(s1)
    state = s1.state_dict()
    s2 = dm.train_dataloader()
    s2.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(next(s1)[1], next(s2)[1])
    big = ArrayDataModule(**_tiny_arrays(n=10), val_size=0, batch_size=25)
    big.setup()
    assert next(iter(big.train_dataloader()))[0].shape[0] == 25


def test_val_and_test_loaders(mnist: MNISTDataModule, real: tuple[Path, dict]) -> None:
    x, y = next(iter(mnist.val_dataloader()))
    assert torch.equal(x, mnist.x_val[:64]) and torch.equal(y, mnist.y_val[:64])
    assert len(mnist.test_dataloader().dataset) == real[1]["n_test"]


@pytest.mark.parametrize("zca", ["trace", "kornia"])
def test_zca_fitted_once_then_cached(zca: str, _tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _tiny_arrays()
    first = ArrayDataModule(**arrays, name="toy", val_size=20, zca=zca)
    first.setup()
    assert first.normalize == (zca == "trace")  # MTT's kornia convention works on unnormalised images
    files = list((_tmp_cache / "zca").glob("toy_*.pt"))
    assert len(files) == 1
    assert f"_{zca}_" in files[0].name and first.preprocessing.zca_matrix.shape == (108, 108)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("ZCA was refitted instead of read from the cache")

    monkeypatch.setattr(real_module, "fit_zca_trace", fail)
    monkeypatch.setattr(real_module, "fit_zca_kornia", fail)
    second = ArrayDataModule(**arrays, name="toy", val_size=20, zca=zca)
    second.setup()
    assert torch.equal(second.preprocessing.zca_matrix, first.preprocessing.zca_matrix)
    assert torch.equal(second.x_test, first.x_test)
    # Another split or other data is another cache entry.
    with pytest.raises(AssertionError, match="refitted"):
        ArrayDataModule(**arrays, name="toy", val_size=20, seed=1, zca=zca).setup()
    with pytest.raises(AssertionError, match="refitted"):
        ArrayDataModule(**_tiny_arrays(seed=5), name="toy", val_size=20, zca=zca).setup()


def test_trace_zca_whitens_training_data() -> None:
    # 400 images of d = 48: the whitened training covariance has eigenvalues λ / (λ + r) <= 1, most near 1.
    dm = ArrayDataModule(**_tiny_arrays(n=400, shape=(3, 4, 4)), val_size=0, zca="trace", zca_reg=0.01)
    dm.setup()
    flat = dm.x_train.reshape(400, -1).double()
    flat = flat - flat.mean(0)
    eig = torch.linalg.eigvalsh(flat.T @ flat / 400)
    assert eig.max() < 1.0 + 1e-4 and eig.min() > 0.5
    back = dm.preprocessing.invert(dm.x_train[:4])
    torch.testing.assert_close(back, dm.load_split("train")[0][:4].float() / 255, atol=1e-4, rtol=0)


def test_registry() -> None:
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet", "imagenet64"}
    for name, cls in DATASETS.items():
        assert cls.name == name and issubclass(cls, RealDataModule)
    assert isinstance(get_datamodule("Fashion-MNIST"), FashionMNISTDataModule)
    assert get_datamodule("mnist", batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="unknown dataset 'imagenet1k': known datasets are mnist, fashion_mnist"):
        get_datamodule("imagenet1k")


def test_missing_root_says_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError, match=r"data root .*nope does not exist: set root .*download=True"):
        MNISTDataModule(root=str(missing)).setup()


def test_missing_dataset_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        MNISTDataModule(root=str(tmp_path)).setup()
    msg = str(err.value)
    assert "\n" not in msg and f"{tmp_path / 'MNIST' / 'raw' / 'train-images-idx3-ubyte'}" in msg
    assert "download=True" in msg and "LIGHTNING_DISTILL_DATA" in msg
    with pytest.raises(DatasetNotFoundError, match=r"cifar10 not found .*cifar10\.npz\.xz\): pass download=True"):
        get_datamodule("cifar10", root=str(tmp_path)).setup()


def test_default_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_DISTILL_DATA", str(tmp_path / "env_root"))
    with pytest.raises(DatasetNotFoundError, match="env_root does not exist"):
        MNISTDataModule().setup()


@pytest.mark.parametrize("bad", [1.5, -1, -0.1, True, "0.1"])
def test_bad_val_size(bad: object) -> None:
    with pytest.raises(ValueError, match=r"val_size must be a fraction in \[0, 1\).*pass e\.g\. val_size=0\.1"):
        MNISTDataModule(val_size=bad)  # type: ignore[arg-type]


def test_val_size_count_forms() -> None:
    assert MNISTDataModule(val_size=5000.0).val_size == 5000  # a config's float form of a count
    dm = ArrayDataModule(**_tiny_arrays(n=10), val_size=10)
    with pytest.raises(ValueError, match="leaves no training images.*pass a smaller val_size"):
        dm.setup()


def test_lightning_fit_consumes_the_stream_and_resumes_it(tmp_path: Path) -> None:
    import lightning as L

    seen: list[torch.Tensor] = []

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(108, 4)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            seen.append(y.clone())
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps: int, ckpt_path: str | None = None) -> L.Trainer:
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(
            Probe(), datamodule=ArrayDataModule(**_tiny_arrays(), val_size=20, batch_size=8), ckpt_path=ckpt_path
        )
        return trainer

    fit(4)
    full = list(seen)
    assert len(full) == 4 and all(len(y) == 8 for y in full)
    expected = ArrayDataModule(**_tiny_arrays(), val_size=20, batch_size=8)
    expected.setup()
    assert torch.equal(full[0], next(expected.train_dataloader())[1])
    # Interrupted after 2 steps and resumed: the stream continues with the batch the full run used next.
    seen.clear()
    fit(2).save_checkpoint(tmp_path / "two.ckpt")
    seen.clear()
    fit(4, ckpt_path=str(tmp_path / "two.ckpt"))
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, full[2:], strict=True))


def test_cli_signature() -> None:
    # LightningCLI builds its config from the __init__ signatures: every DataModule must be parseable.
    from jsonargparse import ArgumentParser

    from lightning_distill.data import ImageFolderDataModule

    for cls in [*DATASETS.values(), ImageFolderDataModule, ArrayDataModule]:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "data")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MNISTDataModule, "data")
    cfg = parser.parse_args(["--data.val_size", "5000", "--data.zca", "trace"])
    dm = MNISTDataModule(**cfg.data.as_dict())
    assert dm.val_size == 5000 and dm.zca == "trace" and dm.normalize


def test_failed_download_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_distill.data.torchvision_sets as tv

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x/, got:\n<urlopen error>")

    monkeypatch.setattr(tv.datasets, "MNIST", offline)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="downloading it failed") as e:
        dm.load_split("test")
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value) and "LIGHTNING_DISTILL_DATA" in str(e.value)
