"""``ExportDistilled``: write the distilled set (and a picture of it) when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_distill.export import save_distilled
from lightning_distill.viz import image_grid, save_grid_png, upscale


class ExportDistilled(L.Callback):
    """Write ``distilled.pt`` (the export format) and ``distilled.png`` (a grid, de-whitened for viewing).

    Args:
        path: the export file; default ``<trainer.default_root_dir>/distilled.pt``. The PNG goes beside it.
        every_n_steps: also export every N outer steps (0: only at the end), so a long run never loses its set.
        png: also write the PNG grid.
    """

    def __init__(self, path: str | None = None, every_n_steps: int = 0, png: bool = True) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.path, self.every_n_steps, self.png = path, every_n_steps, png
        self.last_path: Path | None = None

    def resolve_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "distilled.pt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)

    @rank_zero_only
    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Write the current set now; returns the export's path."""
        payload = pl_module.export_payload()
        path = save_distilled(payload, self.resolve_path(trainer))
        if self.png:
            from lightning_distill.data.preprocess import Preprocessing

            prep = Preprocessing.from_dict(payload["preprocessing"]) if payload["preprocessing"] else None
            grid = image_grid(payload["images"], payload["ipc"], prep)
            save_grid_png(upscale(grid), path.with_suffix(".png"))
        self.last_path = path
        rank_zero_info(f"exported the distilled set to {path}")
        return path
