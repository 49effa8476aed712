"""Small real subsets and tiny DataModules for fast tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_distill.data import ArrayDataModule, MNISTDataModule

_CACHE: dict[tuple, tuple] = {}


def mnist_subset(root: Path, n_train: int = 600, n_test: int = 500, size: int = 28) -> tuple:
    """The first ``n_train``/``n_test`` real MNIST images as uint8 (N, 1, H, W) and labels (cached per session)."""
    key = (str(root), n_train, n_test, size)
    if key not in _CACHE:
        dm = MNISTDataModule(root=str(root))
        x_tr, y_tr = dm.load_split("train")
        x_te, y_te = dm.load_split("test")
        x_tr, y_tr, x_te, y_te = x_tr[:n_train], y_tr[:n_train], x_te[:n_test], y_te[:n_test]
        if size != 28:

            def resize(x):
                return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="area").round().byte()

            x_tr, x_te = resize(x_tr), resize(x_te)
        _CACHE[key] = (x_tr, y_tr, x_te, y_te)
    return _CACHE[key]


def tiny_mnist_dm(root: Path, batch_size: int = 64, n_train: int = 600, seed: int = 0, **kwargs) -> ArrayDataModule:
    """A DataModule over a small real MNIST subset (recorded as an array dataset named ``mnist``)."""
    x_tr, y_tr, x_te, y_te = mnist_subset(root, n_train=n_train)
    return ArrayDataModule(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        name="mnist",
        batch_size=batch_size,
        val_size=100,
        seed=seed,
        **kwargs,
    )


def quiet_trainer(tmp_path: Path, steps: int, callbacks: list | None = None, logger=False, **kwargs):
    """A Trainer (CPU unless ``accelerator`` says otherwise) for ``steps`` outer steps without progress bar, summary
    or default checkpointing."""
    return L.Trainer(
        max_steps=steps,
        accelerator=kwargs.pop("accelerator", "cpu"),
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        default_root_dir=tmp_path,
        callbacks=callbacks or [],
        **kwargs,
    )


class DevicesSeen(L.Callback):
    """Where the method ran at each step, in what precision, and where its set's images lived: ``devices``,
    ``precisions``, ``set_devices``.

    Read during the steps because ``fit``'s teardown moves the whole module back to the CPU (where the precision
    policy would resolve afresh, for the CPU).
    """

    def __init__(self) -> None:
        self.devices: list[str] = []
        self.precisions: list[str] = []
        self.set_devices: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.devices.append(pl_module.device.type)
        self.precisions.append(pl_module.network_precision.dtype)
        images = getattr(pl_module.synthetic, "images", None)
        self.set_devices.append(images.device.type if images is not None else "-")
