"""Pictures of distilled sets: a grid with one row per class."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from lightning_distill.io import atomic_path


def viewable(images: Tensor, preprocessing: Any | None) -> Tensor:
    """Map model-input images back to [0, 1] for viewing (undo ZCA and normalisation, then clip)."""
    x = images.detach().float().cpu()
    if preprocessing is not None:
        x = preprocessing.invert(x)
    else:
        # Unknown preprocessing: stretch each image to its own range.
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x.clamp(0, 1)


def image_grid(images: Tensor, ipc: int, preprocessing: Any | None = None, max_per_class: int = 10) -> Tensor:
    """A ``(3, H', W')`` grid: one row per class, at most ``max_per_class`` images of each."""
    x = viewable(images, preprocessing)
    n_cls = len(x) // ipc
    keep = min(ipc, max_per_class)
    x = x.view(n_cls, ipc, *x.shape[1:])[:, :keep].reshape(n_cls * keep, *x.shape[1:])
    return make_grid(x, nrow=keep, padding=1, pad_value=1.0)


def save_grid_png(grid: Tensor, path: str | os.PathLike) -> Path:
    """Write a grid to PNG atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
    return Path(path)


def upscale(grid: Tensor, min_side: int = 256) -> Tensor:
    """Nearest-neighbour upscaling so that tiny grids (1 image per class of 28 px) are visible."""
    factor = max(1, min_side // max(grid.shape[-2:]))
    return torch.nn.functional.interpolate(grid[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else grid


def set_picture(
    images: Tensor,
    labels: Tensor,
    images_per_class: int,
    preprocessing: Any | None = None,
    class_names: list[str] | None = None,
    max_per_class: int = 10,
    max_classes: int = 20,
    title: str | None = None,
    cell_inches: float = 1.1,
) -> Tensor:
    """A picture of a distilled set a person can read at a glance: a ``(3, H, W)`` tensor in [0, 1].

    Classes are labelled rows (one class per row, its name on the left), or labelled columns when there is one image
    per class, so a 10-image set is one readable row instead of a thin strip. Every image is drawn at least
    ``cell_inches`` (about 110 px) wide. Float labels (soft or learned) are drawn under each image as a bar per class,
    the image's own class in orange, so what a label says about its image is visible beside it.

    Drawn with matplotlib's object-oriented Agg canvas (no pyplot state, the user's backend untouched), because
    torchvision's ``make_grid`` has no text.

    Args:
        images: ``(N, C, H, W)`` in model-input space; ``images_per_class`` consecutive images per class.
        labels: ``(N,)`` class ids or ``(N, K)`` float labels.
        images_per_class: images of each class in ``images``.
        preprocessing: undoes normalisation and ZCA for viewing (``None``: each image stretched to its range).
        class_names: names of the classes (default ``0..K-1``).
        max_per_class: at most this many images of each class are drawn.
        max_classes: at most this many classes are drawn (the title says how many there are).
        title: a line above the picture.
        cell_inches: the side of one image in inches (at 100 dpi).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = viewable(images, preprocessing)
    r = int(images_per_class)
    if r < 1 or len(x) % r:
        raise ValueError(f"{len(x)} images do not split into classes of images_per_class={r}")
    n_cls = len(x) // r
    shown_cls, keep = min(n_cls, max_classes), min(r, max_per_class)
    names = class_names if class_names and len(class_names) == n_cls else [str(c) for c in range(n_cls)]
    floats = labels.is_floating_point() and labels.ndim == 2
    y = labels.detach().float().cpu() if floats else None
    by_columns = keep == 1  # one image per class: classes side by side, names above
    rows, cols = (1, shown_cls) if by_columns else (shown_cls, keep)
    label_h = 0.45 if floats else 0.0
    fig = Figure(figsize=(cols * cell_inches + (0 if by_columns else 1.2), rows * (cell_inches + label_h) + 0.6))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        rows * (2 if floats else 1),
        cols,
        height_ratios=[cell_inches, label_h] * rows if floats else None,
        hspace=0.08,
        wspace=0.05,
    )
    for c in range(shown_cls):
        for j in range(keep):
            i = c * r + j
            row, col = (0, c) if by_columns else (c, j)
            ax = fig.add_subplot(grid[row * (2 if floats else 1), col])
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if by_columns:
                ax.set_title(names[c], fontsize=8)
            elif j == 0:
                ax.set_ylabel(names[c], rotation=0, ha="right", va="center", fontsize=8)
            if floats:
                lab = fig.add_subplot(grid[row * 2 + 1, col])
                colours = ["tab:orange" if k == c else "tab:blue" for k in range(y.shape[1])]
                lab.bar(range(y.shape[1]), y[i].numpy(), color=colours, width=0.8)
                lab.axhline(0, color="k", linewidth=0.4)
                lab.set_xticks([])
                lab.set_yticks([])
                lab.set_xlim(-0.6, y.shape[1] - 0.4)
    more = []
    if shown_cls < n_cls:
        more.append(f"first {shown_cls} of {n_cls} classes")
    if keep < r:
        more.append(f"{keep} of {r} images per class")
    heading = " · ".join(
        ([title] if title else []) + more + (["labels: bar per class, own class orange"] if floats else [])
    )
    if heading:
        fig.suptitle(heading, fontsize=8)
    # A tight bounding box drops the margins matplotlib leaves around square images.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    buffer.seek(0)
    rgb = np.asarray(Image.open(buffer).convert("RGB")).copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
