"""``ExportDistilled``: write the distilled set (and a picture of it) when training ends, and log it to W&B."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_distill.export import save_distilled
from lightning_distill.io import remove_orphaned_temporaries
from lightning_distill.viz import save_grid_png, set_picture

#: What the artifact's metadata records of the export.
_METADATA = ("dataset", "num_classes", "ipc", "images_per_class", "label_kind", "method", "seed", "step", "version")


class ExportDistilled(L.Callback):
    """Write ``distilled.pt`` (the export format) and ``distilled.png`` (a labelled picture, de-whitened for viewing).

    When training ends, the export also goes to every :class:`~lightning.pytorch.loggers.WandbLogger` as a W&B artifact
    ``distilled-<dataset>-ipc<k>`` of type ``distilled-set`` holding ``distilled.pt`` (and ``distilled.png``). Only
    global rank 0 writes or logs anything.

    Args:
        path: the export file; default ``<trainer.default_root_dir>/distilled.pt``. The PNG goes beside it.
        every_n_steps: also export every N outer steps (0: only at the end), so a long run never loses its set.
        png: also write the PNG grid.
        artifact: log the final export as a W&B artifact (only with a WandbLogger).
    """

    def __init__(
        self, path: str | None = None, every_n_steps: int = 0, png: bool = True, artifact: bool = True
    ) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.path, self.every_n_steps, self.png, self.artifact = path, every_n_steps, png, artifact
        self.last_path: Path | None = None
        self._last_payload: dict[str, Any] | None = None

    def resolve_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "distilled.pt"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # An export killed mid-write (SIGKILL, OOM) left its temporary file beside the destination: remove it now
        # (only those of this export's files, and only when their writer no longer runs).
        if stage == "fit" and trainer.is_global_zero:
            path = self.resolve_path(trainer)
            for p in remove_orphaned_temporaries(path.parent, [path.name, path.with_suffix(".png").name]):
                rank_zero_info(f"removed {p}, left by an export that was killed")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.export(trainer, pl_module)
        if self.artifact and path is not None:  # None off rank 0
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    self.log_artifact(logger, path)

    @rank_zero_only
    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the current set now; returns the export's path."""
        payload = pl_module.export_payload()
        path = save_distilled(payload, self.resolve_path(trainer))
        if self.png:
            from lightning_distill.data.preprocess import Preprocessing

            prep = Preprocessing.from_dict(payload["preprocessing"]) if payload["preprocessing"] else None
            # Labelled classes, the generated images per class (a factorised set's differ from its ipc budget), and
            # float labels drawn beside their images.
            picture = set_picture(
                payload["images"],
                payload["labels"],
                payload.get("images_per_class", payload["ipc"]),
                prep,
                class_names=payload.get("class_names") or None,
                title=f"{payload['method']} · {payload['dataset']} · ipc {payload['ipc']} · step {payload.get('step')}",
            )
            save_grid_png(picture, path.with_suffix(".png"))
        self.last_path = path
        self._last_payload = payload
        rank_zero_info(f"exported the distilled set to {path}")
        return path

    def log_artifact(self, logger: WandbLogger, path: Path) -> Any:
        """Log the export at ``path`` (and its PNG, when there is one) as a W&B artifact; returns the artifact."""
        import wandb

        payload = self._last_payload if self.last_path == path else None
        if payload is None:
            from lightning_distill.export import load_distilled

            payload = load_distilled(path)
        # W&B artifact names allow letters, digits, '-', '_' and '.': custom dataset names may hold anything else.
        dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", str(payload["dataset"]))
        artifact = wandb.Artifact(
            name=f"distilled-{dataset}-ipc{payload['ipc']}",
            type="distilled-set",
            description=f"{payload['method']} on {payload['dataset']}, {payload['ipc']} images per class",
            metadata={k: payload.get(k) for k in _METADATA},
        )
        # add_file copies the file into W&B's staging area (the default "mutable" policy): a later export over the
        # same path does not change what was logged.
        artifact.add_file(str(path), name="distilled.pt")
        png = path.with_suffix(".png")
        if self.png and png.is_file():
            artifact.add_file(str(png), name="distilled.png")
        logger.experiment.log_artifact(artifact)
        return artifact
