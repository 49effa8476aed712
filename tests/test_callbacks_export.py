"""ExportDistilled: the export files, and the final set as a W&B artifact (offline run)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_distill.callbacks import ExportDistilled
from lightning_distill.export import load_distilled
from lightning_distill.methods import FRePo
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


def _fit(root: Path, tmp_path: Path, callbacks: list, steps: int, logger=False) -> FRePo:
    L.seed_everything(0, verbose=False)
    method = _frepo()
    quiet_trainer(tmp_path, steps, callbacks, logger=logger).fit(method, datamodule=tiny_mnist_dm(root, batch_size=32))
    return method


def test_artifact_in_an_offline_wandb_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="test")
    run = logger.experiment
    real_log_artifact = run.log_artifact
    artifacts: list = []

    def spy_log_artifact(artifact, *args, **kwargs):
        # W&B has its own copy of the files (the "mutable" policy stages them), so a later export cannot change them.
        entries = artifact.manifest.entries
        artifacts.append((artifact, load_distilled(entries["distilled.pt"].local_path), set(entries)))
        return real_log_artifact(artifact, *args, **kwargs)

    monkeypatch.setattr(run, "log_artifact", spy_log_artifact)
    logged = ExportDistilled(path=str(tmp_path / "a" / "distilled.pt"))
    silent = ExportDistilled(path=str(tmp_path / "b" / "distilled.pt"), artifact=False, png=False)
    method = _fit(data_root, tmp_path, [logged, silent], steps=2, logger=logger)

    assert len(artifacts) == 1  # one per WandbLogger, and none from the callback with artifact=False
    artifact, payload, names = artifacts[0]
    assert artifact.name.startswith("distilled-mnist-ipc1") and artifact.type == "distilled-set"
    assert names == {"distilled.pt", "distilled.png"}
    assert artifact.metadata["method"] == "FRePo" and artifact.metadata["ipc"] == 1 and artifact.metadata["step"] == 2
    on_disk = load_distilled(tmp_path / "a" / "distilled.pt")
    assert torch.equal(payload["images"], on_disk["images"]) and torch.equal(payload["labels"], on_disk["labels"])
    assert torch.equal(payload["images"], method.distilled_view().images.cpu())
    assert (tmp_path / "b" / "distilled.pt").is_file() and not (tmp_path / "b" / "distilled.png").exists()


def test_no_wandb_logger_no_artifact(data_root, tmp_path, monkeypatch):
    import wandb

    def refuse(*args, **kwargs):
        raise AssertionError("no artifact without a WandbLogger")

    monkeypatch.setattr(wandb, "Artifact", refuse)
    cb = ExportDistilled(every_n_steps=1)
    _fit(data_root, tmp_path, [cb], steps=2, logger=CSVLogger(tmp_path))
    assert cb.last_path == tmp_path / "distilled.pt" and load_distilled(cb.last_path)["step"] == 2
    assert (tmp_path / "distilled.png").is_file()


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        ExportDistilled(every_n_steps=-1)
