"""The evaluation-time augmentation of FRePo and RCIG, with explicit, replayable parameters."""

from __future__ import annotations

import torch
from torch import nn

from lightning_distill.augment import _common as C
from lightning_distill.augment import functional as AF
from lightning_distill.augment._common import AugParams

__all__ = ["KRRAugment"]

KRR_OPS: tuple[str, ...] = ("flip", "color", "crop", "rotate", "translate", "cutout")


class KRRAugment(nn.Module):
    """Evaluation augmentation of FRePo (Zhou et al., NeurIPS 2022) and RCIG (Loo et al., ICML 2023).

    Every call draws one op for the whole batch (FRePo) or one op per image (RCIG, ``per_image_op=True``) from
    ``ops``, and fresh per-image parameters:

    - ``flip``: horizontal flip with probability ``flip_prob``.
    - ``color``: brightness shift ``U[-s, s]``, then saturation and contrast factors ``U[1 - s, 1 + s]``
      (``s = color_strength``), with the linear formulas of :mod:`~lightning_distill.augment.functional`.
    - ``crop``: random resized crop: zoom ``U[zoom_min, zoom_max]`` about a window centre drawn so that the window
      stays inside the image (zoom > 1) or the image inside the window (zoom < 1); bilinear, zero fill.
    - ``rotate``: angle ``U[-rotate_degrees, rotate_degrees]``.
    - ``translate``: whole-pixel shift of up to ``translate_ratio`` of the side per axis, zero fill.
    - ``cutout``: one hole of side ``cutout_ratio`` of the image side (8 px at 32 px), filled with 0.

    Drop ``flip`` from ``ops`` for digits (MNIST, Fashion-MNIST), as both papers do.

    Args:
        ops: underscore-joined op names from ``flip, color, crop, rotate, translate, cutout``.
        per_image_op: draw the op per image (RCIG) instead of once per batch (FRePo).
        flip_prob: probability of a horizontal flip.
        color_strength: strength ``s`` of the brightness, saturation and contrast jitter.
        zoom_min: smallest zoom of the random resized crop.
        zoom_max: largest zoom of the random resized crop.
        rotate_degrees: maximal rotation angle.
        translate_ratio: maximal shift as a fraction of the side, rounded to whole pixels.
        cutout_ratio: side of the hole as a fraction of the image side.

    Shape:
        - Input: ``(B, C, H, W)``, any float dtype and value range (never clamped).
        - Output: ``(B, C, H, W)``.

    Example:
        >>> aug = KRRAugment(ops="color_crop_rotate_translate_cutout")      # MNIST: no flip
        >>> out = aug(torch.randn(8, 1, 28, 28), generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([8, 1, 28, 28])
    """

    def __init__(
        self,
        ops: str = "flip_color_crop_rotate_translate_cutout",
        per_image_op: bool = False,
        flip_prob: float = 0.5,
        color_strength: float = 0.25,
        zoom_min: float = 0.8,
        zoom_max: float = 1.25,
        rotate_degrees: float = 15.0,
        translate_ratio: float = 0.125,
        cutout_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        self.ops = C.parse_ops(ops, KRR_OPS, "KRRAugment")
        self.ops_string = ops
        self.per_image_op = per_image_op
        self.flip_prob = flip_prob
        self.color_strength = color_strength
        self.zoom_min = zoom_min
        self.zoom_max = zoom_max
        self.rotate_degrees = rotate_degrees
        self.translate_ratio = translate_ratio
        self.cutout_ratio = cutout_ratio

    def extra_repr(self) -> str:
        return f"ops={self.ops_string!r}, per_image_op={self.per_image_op}"

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> AugParams:
        """Draw the op choice and per-image parameters for a batch.

        Args:
            batch_size: number of images.
            generator: the only source of randomness; draws happen on its device.
            device: where the returned tensors live; ``None`` keeps the generator's device.

        Returns:
            ``op``: int64 ``(B,)`` indices into ``self.ops`` (all equal unless ``per_image_op``), and ``(B,)``
            tensors for every op in ``ops``: ``flip`` (bool); ``brightness`` (shift), ``saturation``, ``contrast``
            (factors); ``zoom``, ``crop_x``, ``crop_y`` (window offset in ``[-1, 1)`` of its free range); ``angle``
            (degrees); ``translate_x``, ``translate_y``, ``cutout_x``, ``cutout_y`` (unit draws in ``[0, 1)``,
            turned into whole pixels for the image size at ``apply``).
        """
        g = C.check_generator(generator)
        n = int(batch_size)
        k = len(self.ops)
        op = C.randint(g, n, k) if self.per_image_op else C.randint(g, 1, k).expand(n).clone()
        params: AugParams = {"op": op}
        s = self.color_strength
        for name in self.ops:
            if name == "flip":
                params["flip"] = C.uniform(g, n) < self.flip_prob
            elif name == "color":
                params["brightness"] = C.uniform(g, n, -s, s)
                params["saturation"] = C.uniform(g, n, 1 - s, 1 + s)
                params["contrast"] = C.uniform(g, n, 1 - s, 1 + s)
            elif name == "crop":
                params["zoom"] = C.uniform(g, n, self.zoom_min, self.zoom_max)
                params["crop_x"], params["crop_y"] = C.uniform(g, n, -1, 1), C.uniform(g, n, -1, 1)
            elif name == "rotate":
                params["angle"] = C.uniform(g, n, -self.rotate_degrees, self.rotate_degrees)
            elif name == "translate":
                params["translate_x"], params["translate_y"] = C.uniform(g, n), C.uniform(g, n)
            else:  # cutout
                params["cutout_x"], params["cutout_y"] = C.uniform(g, n), C.uniform(g, n)
        return C.to_device(params, device)

    def _apply_op(self, name: str, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        _, _, h, w = x.shape
        if name == "flip":
            return AF.flip(x, p["flip"])
        if name == "color":
            x = AF.brightness(x, p["brightness"])
            x = AF.saturation(x, p["saturation"])
            return AF.contrast(x, p["contrast"])
        if name == "crop":
            zoom = p["zoom"].to(x.dtype)
            # The crop window spans `(side - 1) / zoom` pixel centres (align_corners geometry); its centre may move by
            # half the size difference, which keeps it inside the image when zooming in and keeps the image inside
            # it when zooming out.
            off_x = p["crop_x"].to(x.dtype) * (w - 1) * (1 - 1 / zoom).abs() / 2
            off_y = p["crop_y"].to(x.dtype) * (h - 1) * (1 - 1 / zoom).abs() / 2
            return AF.affine(x, zoom_x=zoom, zoom_y=zoom, shift_x=-zoom * off_x, shift_y=-zoom * off_y)
        if name == "rotate":
            return AF.rotate(x, p["angle"])
        if name == "translate":
            sx, sy = int(w * self.translate_ratio + 0.5), int(h * self.translate_ratio + 0.5)
            return AF.translate(x, C.unit_to_int(p["translate_x"], -sx, sx), C.unit_to_int(p["translate_y"], -sy, sy))
        if name == "cutout":
            size_h, size_w = max(1, int(h * self.cutout_ratio + 0.5)), max(1, int(w * self.cutout_ratio + 0.5))
            cx = C.unit_to_int(p["cutout_x"], 0, w - 1)
            cy = C.unit_to_int(p["cutout_y"], 0, h - 1)
            return AF.cutout(x, cx, cy, (size_h, size_w))
        raise ValueError(f"KRRAugment: unknown op {name!r}; known ops: {', '.join(KRR_OPS)}")

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply previously drawn parameters (replay); differentiable with respect to ``x``.

        Args:
            x: images ``(B, C, H, W)``.
            params: a dict from :meth:`sample` for a batch of ``B`` images.

        Returns:
            The augmented images.
        """
        op = params["op"]
        if not isinstance(op, torch.Tensor) or op.shape != (x.shape[0],):
            raise ValueError(f"KRRAugment: params are for a batch of {getattr(op, 'shape', '?')}, got {x.shape[0]}")
        op = op.to(x.device)
        out = x
        for k, name in enumerate(self.ops):
            chosen = op == k
            idx = chosen.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            if idx.numel() == x.shape[0]:  # the whole batch (always so for FRePo): no gather/scatter
                return self._apply_op(name, x, params)
            sub = {key: v[idx.to(v.device)] for key, v in params.items() if isinstance(v, torch.Tensor)}
            out = out.index_copy(0, idx, self._apply_op(name, x[idx], sub))
        return out

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, params: AugParams | None = None
    ) -> torch.Tensor:
        """Augment ``x`` with replayed ``params``, or with a fresh draw from ``generator``.

        Args:
            x: images ``(B, C, H, W)``.
            generator: used when ``params`` is ``None``.
            params: a dict from :meth:`sample` to replay.

        Returns:
            The augmented images.

        Raises:
            ValueError: if neither ``generator`` nor ``params`` is given.
        """
        if params is None:
            params = self.sample(x.shape[0], C.check_generator(generator), x.device)
        return self.apply(x, params)
