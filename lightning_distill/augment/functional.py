"""Pure, differentiable augmentation ops on image batches with explicit per-image parameters.

Every op takes an image batch ``x`` of shape ``(B, C, H, W)`` (any floating dtype, any value range: inputs are
usually normalised or ZCA-whitened, so nothing is ever clamped) and per-image parameter tensors of shape ``(B,)`` or
``(1,)``. A ``(1,)`` parameter is broadcast to the whole batch, which is how siamese augmentation replays one draw
on a real and a synthetic batch of different sizes. No op draws random numbers: samplers live in
:mod:`lightning_distill.augment.dsa` and :mod:`lightning_distill.augment.krr_augment`.

The colour formulas follow DSA (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation",
ICML 2021); the geometric warps use :func:`kornia.geometry.transform.warp_affine` (bilinear, zero fill).
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

__all__ = [
    "affine",
    "brightness",
    "contrast",
    "cutout",
    "flip",
    "rotate",
    "saturation",
    "scale",
    "translate",
]

ParamLike = torch.Tensor | float | int


def _per_image(p: ParamLike, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``p`` as a 1-D tensor of length 1 or ``B`` on ``x``'s device, in ``dtype`` (``x.dtype`` by default)."""
    t = torch.as_tensor(p, device=x.device, dtype=dtype if dtype is not None else x.dtype).reshape(-1)
    if t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"a per-image parameter needs length 1 or the batch size {x.shape[0]}, got {t.shape[0]}")
    return t


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")


def brightness(x: torch.Tensor, delta: ParamLike) -> torch.Tensor:
    """Add a per-image constant: ``x + delta``.

    Args:
        x: images ``(B, C, H, W)``.
        delta: additive shift, ``(B,)`` or ``(1,)``. DSA draws ``(u - 0.5) * brightness`` with ``u ~ U[0, 1)``.

    Returns:
        The shifted images, same shape and dtype.
    """
    _check_images(x)
    return x + _per_image(delta, x).view(-1, 1, 1, 1)


def saturation(x: torch.Tensor, factor: ParamLike) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean: ``(x - mean_C(x)) * factor + mean_C(x)``.

    This is DSA's linear saturation on (normalised) tensors, not kornia's HSV saturation, which clamps.

    Args:
        x: images ``(B, C, H, W)``.
        factor: ``(B,)`` or ``(1,)``; 0 gives a grey image, 1 the identity. DSA draws ``u * saturation``.

    Returns:
        The re-saturated images, same shape and dtype.
    """
    _check_images(x)
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_image(factor, x).view(-1, 1, 1, 1) + mean


def contrast(x: torch.Tensor, factor: ParamLike) -> torch.Tensor:
    """Scale each image's deviation from its mean over (C, H, W): ``(x - mean(x)) * factor + mean(x)``.

    Args:
        x: images ``(B, C, H, W)``.
        factor: ``(B,)`` or ``(1,)``; 1 is the identity. DSA draws ``u + contrast`` (``u + 0.5`` by default).

    Returns:
        The contrast-adjusted images, same shape and dtype.
    """
    _check_images(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_image(factor, x).view(-1, 1, 1, 1) + mean


def flip(x: torch.Tensor, mask: torch.Tensor | bool) -> torch.Tensor:
    """Mirror the chosen images left-right.

    Args:
        x: images ``(B, C, H, W)``.
        mask: boolean ``(B,)`` or ``(1,)``; ``True`` flips that image.

    Returns:
        The images with the chosen ones flipped along the width axis.
    """
    _check_images(x)
    m = _per_image(mask, x, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(m, torch.flip(x, dims=[-1]), x)


def translate(x: torch.Tensor, shift_x: ParamLike, shift_y: ParamLike) -> torch.Tensor:
    """Shift each image by a whole number of pixels, filling the uncovered border with 0.

    An exact gather instead of a bilinear warp: integer shifts (DSA's crop, FRePo's translate) then move pixels
    without any interpolation error and cost two ``gather`` calls.

    Args:
        x: images ``(B, C, H, W)``.
        shift_x: pixels to move the content right (negative: left), ``(B,)`` or ``(1,)``; rounded to integers.
        shift_y: pixels to move the content down (negative: up), ``(B,)`` or ``(1,)``; rounded to integers.

    Returns:
        The shifted images: ``out[..., i, j] = x[..., i - shift_y, j - shift_x]`` where that is inside the image,
        else 0.
    """
    _check_images(x)
    b, c, h, w = x.shape
    sx = _per_image(shift_x, x, dtype=torch.float32).round().long()
    sy = _per_image(shift_y, x, dtype=torch.float32).round().long()
    rows = torch.arange(h, device=x.device).view(1, h) - sy.view(-1, 1)  # (P, H): source row of each output row
    cols = torch.arange(w, device=x.device).view(1, w) - sx.view(-1, 1)  # (P, W)
    inside = ((rows >= 0) & (rows < h)).view(-1, 1, h, 1) & ((cols >= 0) & (cols < w)).view(-1, 1, 1, w)
    rows = rows.clamp(0, h - 1).view(-1, 1, h, 1).expand(b, c, h, w)
    cols = cols.clamp(0, w - 1).view(-1, 1, 1, w).expand(b, c, h, w)
    out = x.gather(2, rows).gather(3, cols)
    return torch.where(inside, out, torch.zeros((), dtype=x.dtype, device=x.device))


def cutout(x: torch.Tensor, centre_x: ParamLike, centre_y: ParamLike, size: int | tuple[int, int]) -> torch.Tensor:
    """Zero a square (or rectangular) hole per image; the hole may stick out of the image.

    Args:
        x: images ``(B, C, H, W)``.
        centre_x: hole centre column in pixels, ``(B,)`` or ``(1,)``; rounded to integers.
        centre_y: hole centre row in pixels, ``(B,)`` or ``(1,)``; rounded to integers.
        size: hole side in pixels, or ``(height, width)``. The hole covers rows
            ``[centre_y - size // 2, centre_y - size // 2 + size)`` and likewise for columns (DSA's convention).

    Returns:
        The images with the hole set to exactly 0.
    """
    _check_images(x)
    _, _, h, w = x.shape
    size_h, size_w = (size, size) if isinstance(size, int) else size
    cx = _per_image(centre_x, x, dtype=torch.float32).round().long()
    cy = _per_image(centre_y, x, dtype=torch.float32).round().long()
    top = (cy - size_h // 2).view(-1, 1)
    left = (cx - size_w // 2).view(-1, 1)
    r = torch.arange(h, device=x.device).view(1, h)
    col = torch.arange(w, device=x.device).view(1, w)
    in_rows = (r >= top) & (r < top + size_h)
    in_cols = (col >= left) & (col < left + size_w)
    hole = in_rows.view(-1, 1, h, 1) & in_cols.view(-1, 1, 1, w)
    return torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)


def affine(
    x: torch.Tensor,
    angle: ParamLike = 0.0,
    zoom_x: ParamLike = 1.0,
    zoom_y: ParamLike = 1.0,
    shift_x: ParamLike = 0.0,
    shift_y: ParamLike = 0.0,
) -> torch.Tensor:
    """Warp each image by a zoom, then a rotation about the image centre, then a shift (bilinear, zero fill).

    A source pixel ``p`` (``(x, y)`` in pixels, origin top-left) lands at ``R(angle) Z (p - c) + c + shift``,
    where ``c = ((W - 1) / 2, (H - 1) / 2)`` and ``Z = diag(zoom_x, zoom_y)``. Built with
    :func:`kornia.geometry.transform.get_rotation_matrix2d` and applied with
    :func:`kornia.geometry.transform.warp_affine` (``align_corners=True``, so a 90° turn of a square image maps pixel
    centres onto pixel centres).

    Args:
        x: images ``(B, C, H, W)``.
        angle: rotation in degrees, counter-clockwise as displayed; ``(B,)`` or ``(1,)``.
        zoom_x: horizontal magnification of the content (2 doubles its width), ``(B,)`` or ``(1,)``.
        zoom_y: vertical magnification of the content, ``(B,)`` or ``(1,)``.
        shift_x: horizontal shift in output pixels (positive: right), ``(B,)`` or ``(1,)``.
        shift_y: vertical shift in output pixels (positive: down), ``(B,)`` or ``(1,)``.

    Returns:
        The warped images, same shape and dtype.
    """
    _check_images(x)
    _, _, h, w = x.shape
    # Half-precision sampling grids are off by a sizeable fraction of a pixel, so half inputs warp in float32 and
    # are cast back; float64 inputs keep float64 geometry (gradcheck).
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    params = [_per_image(p, x, dtype=dt) for p in (angle, zoom_x, zoom_y, shift_x, shift_y)]
    n = max(p.shape[0] for p in params)
    ang, zx, zy, tx, ty = (p.expand(n) for p in params)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=dt, device=x.device).expand(n, 2)
    m = get_rotation_matrix2d(centre, ang, torch.stack([zx, zy], dim=1))
    m = torch.cat([m[..., :2], m[..., 2:] + torch.stack([tx, ty], dim=1).unsqueeze(-1)], dim=-1)
    # A (1, 2, 3) matrix makes kornia build one grid and expand it over the batch (the siamese case).
    out = warp_affine(x.to(dt), m, (h, w), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(x.dtype)


def rotate(x: torch.Tensor, angle: ParamLike) -> torch.Tensor:
    """Rotate each image about its centre (bilinear, zero fill).

    Args:
        x: images ``(B, C, H, W)``.
        angle: degrees, counter-clockwise as displayed, ``(B,)`` or ``(1,)``.

    Returns:
        The rotated images, same shape and dtype.
    """
    return affine(x, angle=angle)


def scale(x: torch.Tensor, zoom_x: ParamLike, zoom_y: ParamLike) -> torch.Tensor:
    """Zoom each image about its centre, independently per axis (bilinear, zero fill).

    Args:
        x: images ``(B, C, H, W)``.
        zoom_x: horizontal magnification of the content, ``(B,)`` or ``(1,)``; below 1 shrinks it.
        zoom_y: vertical magnification of the content, ``(B,)`` or ``(1,)``.

    Returns:
        The zoomed images, same shape and dtype.
    """
    return affine(x, zoom_x=zoom_x, zoom_y=zoom_y)
