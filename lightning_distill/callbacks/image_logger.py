"""``SyntheticImageLogger``: pictures of the synthetic set (and its learned labels) while it is learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_distill.viz import save_grid_png, set_picture


class SyntheticImageLogger(L.Callback):
    """Log a grid of the synthetic images (one row per class) every N outer steps and when training ends.

    Images are de-whitened for viewing with the DataModule's ``preprocessing``. When the labels are float
    (soft or learned), a heat map of ``y_syn`` (one row per synthetic image, one column per class) is logged beside
    the grid. The set is read through the method's ``distilled_view()`` (what export and evaluation see too). With a
    :class:`~lightning.pytorch.loggers.WandbLogger` both go to W&B under ``synthetic/images`` and
    ``synthetic/labels``; without one, PNGs are written to ``<dirpath>/step_<N>.png`` (and ``step_<N>_labels.png``).
    Only global rank 0 does any of this. The final set as a W&B artifact comes from :class:`ExportDistilled`.

    Args:
        every_n_steps: log every N outer steps; 0 logs only when training ends.
        at_end: also log when training ends.
        dirpath: folder of the PNGs; default ``<trainer.default_root_dir>/images``.
        max_per_class: at most this many images of each class in the grid.
        labels: also log the heat map of float labels.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        at_end: bool = True,
        dirpath: str | None = None,
        max_per_class: int = 10,
        labels: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end), got {every_n_steps!r}")
        if max_per_class < 1:
            raise ValueError(f"max_per_class must be positive, got {max_per_class}")
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.dirpath = dirpath
        self.max_per_class = max_per_class
        self.labels = labels
        self._last_step: int | None = None
        #: Files written by the last call without a W&B logger (for scripts and tests).
        self.last_paths: list[Path] = []

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        """The folder the PNGs go to."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "images"

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.log_images(trainer, pl_module)

    # ---------------------------------------------------------------------------------------------- logging
    @rank_zero_only
    def log_images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the current set now: to every WandbLogger, else as PNG files."""
        step = int(trainer.global_step)
        self._last_step = step
        view = pl_module.distilled_view()
        per_class = view.images_per_class
        names = getattr(trainer.datamodule, "class_names", None) or pl_module.data_info.get("class_names") or None
        grid = set_picture(
            view.images,
            view.labels,
            per_class,
            _preprocessing(trainer, pl_module),
            class_names=list(names) if names else None,
            max_per_class=self.max_per_class,
            title=f"step {step}",
        )
        heat = None
        if self.labels and view.labels.is_floating_point() and view.labels.ndim == 2:
            heat = label_heatmap(view.labels, per_class, getattr(trainer.datamodule, "class_names", None), step)
        wandb_loggers = _wandb_loggers(trainer)
        for logger in wandb_loggers:
            caption = [f"step {step}"]
            logger.log_image(key="synthetic/images", images=[_to_hwc_uint8(grid)], step=step, caption=caption)
            if heat is not None:
                logger.log_image(key="synthetic/labels", images=[_to_hwc_uint8(heat)], step=step, caption=caption)
        self.last_paths = []
        if not wandb_loggers:
            folder = self.resolve_dir(trainer)
            self.last_paths.append(save_grid_png(grid, folder / f"step_{step}.png"))
            if heat is not None:
                self.last_paths.append(save_grid_png(heat, folder / f"step_{step}_labels.png"))


def label_heatmap(labels: Tensor, ipc: int, class_names: list[str] | None = None, step: int | None = None) -> Tensor:
    """A ``(3, H, W)`` picture in [0, 1] of float labels ``(N, K)``: one row per synthetic image, one column per class.

    The colour scale is symmetric around 0 (centred labels are negative off the true class).
    """
    # The object-oriented Agg canvas leaves pyplot's global state (and the user's backend) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = labels.detach().float().cpu().numpy()
    n, k = y.shape
    vmax = float(np.abs(y).max()) or 1.0
    fig = Figure(figsize=(min(2 + 0.35 * k, 16), min(1.5 + 0.12 * n, 12)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(y, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("class")
    ax.set_ylabel(f"synthetic image ({ipc} per class)")
    if k <= 20:
        ax.set_xticks(range(k))
        ax.set_xticklabels(class_names if class_names and len(class_names) == k else range(k), rotation=90)
    # Lines between the classes' blocks of rows show which rows belong to which class.
    if ipc > 1 and n // ipc <= 50:
        for c in range(1, n // ipc):
            ax.axhline(c * ipc - 0.5, color="k", linewidth=0.5)
    if step is not None:
        ax.set_title(f"labels at step {step}")
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _preprocessing(trainer: L.Trainer, pl_module: L.LightningModule) -> Any | None:
    prep = getattr(trainer.datamodule, "preprocessing", None)
    if prep is not None:
        return prep
    # No DataModule at hand (e.g. a restored module): fall back on what the method recorded about the data.
    recorded = getattr(pl_module, "data_info", {}).get("preprocessing")
    if recorded:
        from lightning_distill.data.preprocess import Preprocessing

        return Preprocessing.from_dict(recorded)
    return None


def _to_hwc_uint8(image: Tensor) -> np.ndarray:
    # W&B takes height x width x channel arrays; a (C, H, W) tensor would be read the wrong way round.
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
