"""SyntheticImageLogger: PNGs without W&B, images in an offline W&B run (the artifact is ExportDistilled's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from lightning_distill.callbacks import SyntheticImageLogger
from lightning_distill.callbacks.image_logger import label_heatmap
from lightning_distill.methods import FRePo, RandomSubset
from lightning_distill.optim import CosineDecay
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm


def _frepo() -> FRePo:
    return FRePo(
        synthetic=PixelSet(ipc=1, labels="learned"),
        arch_kwargs={"width": 4},
        pool_size=2,
        syn_scheduler=lambda o: CosineDecay(o, total_steps=10),
    )


def _fit(root: Path, tmp_path: Path, callback: SyntheticImageLogger, steps: int, method=None, logger=None):
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, steps, [callback], logger=logger if logger is not None else False)
    method = method if method is not None else _frepo()
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=32))
    return method, trainer


def test_pngs_without_wandb(data_root, tmp_path):
    cb = SyntheticImageLogger(every_n_steps=2)
    method, _ = _fit(data_root, tmp_path, cb, steps=3, logger=CSVLogger(tmp_path))
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    # Steps 2 and 3 (the end); learned labels also get their heat map; no temporary files are left behind.
    assert names == ["step_2.png", "step_2_labels.png", "step_3.png", "step_3_labels.png"]
    with Image.open(tmp_path / "images" / "step_3.png") as im:
        w, h = im.size
    # One image per class: the classes side by side, each enlarged to about 100 px (not a 30 x 291 strip).
    assert w >= 10 * 80 and h >= 100
    with Image.open(tmp_path / "images" / "step_3_labels.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert cb.last_paths == [tmp_path / "images" / "step_3.png", tmp_path / "images" / "step_3_labels.png"]


def test_hard_labels_get_no_heatmap_and_dirpath(data_root, tmp_path):
    cb = SyntheticImageLogger(every_n_steps=0, dirpath=str(tmp_path / "pics"))
    _fit(data_root, tmp_path, cb, steps=2, method=RandomSubset(synthetic=PixelSet(ipc=2)))
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["step_2.png"]


def test_label_heatmap_picture():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    labels = torch.randn(20, 10)
    pic = label_heatmap(labels, ipc=2, class_names=[str(i) for i in range(10)], step=5)
    assert pic.ndim == 3 and pic.shape[0] == 3 and pic.min() >= 0 and pic.max() <= 1
    # The global pyplot state is left alone (no figure opened, whatever other tests left open).
    assert plt.get_fignums() == before


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SyntheticImageLogger(every_n_steps=-1)
    with pytest.raises(ValueError, match="max_per_class"):
        SyntheticImageLogger(max_per_class=0)


def test_reads_the_distilled_view(data_root, tmp_path, monkeypatch):
    # The picture is of what distilled_view() returns (an average, teacher labels...), not of method.synthetic.
    method = RandomSubset(synthetic=PixelSet(ipc=2))
    calls = []
    real_view = method.distilled_view

    def first_of_each_class():
        view = real_view()
        calls.append(view.images_per_class)
        keep = slice(None, None, view.images_per_class)
        return dataclasses.replace(
            view, images=view.images[keep], labels=view.labels[keep], class_ids=view.class_ids[keep], images_per_class=1
        )

    monkeypatch.setattr(method, "distilled_view", first_of_each_class)
    cb = SyntheticImageLogger(every_n_steps=0)
    _fit(data_root, tmp_path, cb, steps=1, method=method)
    assert calls and set(calls) == {2}
    with Image.open(tmp_path / "images" / "step_1.png") as im:
        # One image per class, as the view says (the set holds two): one row of the ten classes side by side.
        assert im.size[0] >= 10 * 80 and im.size[1] < 2 * 110


def test_wandb_offline_images(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="test")
    logged: list[tuple[str, int]] = []
    artifacts: list = []
    real_log_image = logger.log_image

    def spy_log_image(key, images, step=None, **kwargs):
        logged.append((key, step))
        assert images[0].ndim == 3 and images[0].shape[-1] == 3  # height x width x RGB for W&B
        return real_log_image(key, images, step=step, **kwargs)

    monkeypatch.setattr(logger, "log_image", spy_log_image)
    run = logger.experiment
    monkeypatch.setattr(run, "log_artifact", lambda artifact, *a, **k: artifacts.append(artifact))
    cb = SyntheticImageLogger(every_n_steps=2)
    _fit(data_root, tmp_path, cb, steps=2, logger=logger)

    assert logged == [("synthetic/images", 2), ("synthetic/labels", 2)]
    assert not (tmp_path / "images").exists()
    assert artifacts == []  # the distilled set's artifact comes from ExportDistilled now
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    media = runs[0] / "files" / "media" / "images" / "synthetic"
    assert len(list(media.glob("images_*.png"))) == 1 and len(list(media.glob("labels_*.png"))) == 1
