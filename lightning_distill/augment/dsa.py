"""Differentiable Siamese Augmentation (DSA) with explicit, replayable parameters."""

from __future__ import annotations

import torch
from torch import nn

from lightning_distill.augment import _common as C
from lightning_distill.augment import functional as AF
from lightning_distill.augment._common import AugParams

__all__ = ["DSA"]

DSA_OPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")


class DSA(nn.Module):
    """Differentiable Siamese Augmentation (DSA) with explicit, replayable parameters.

    Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021. Parameters are drawn
    from an explicit ``torch.Generator`` only, into a dict that :meth:`apply` replays.

    Each call picks **one** op group of ``strategy`` uniformly at random (DSA's ``aug_mode='S'``); ``color`` applies
    brightness, saturation and contrast together, every other group is one op. With ``batchwise=True`` (distillation
    time) one parameter set is drawn and broadcast to the whole batch, so the same draw replays on a real batch of
    256 and a synthetic batch of 10; with ``batchwise=False`` (evaluation) every image gets its own parameters.

    The default numbers are DSA's ``ParamDiffAug``. The geometric ops use kornia's bilinear warp (pixel-centre
    geometry, zero fill); no numerical parity test against DSA's own ``affine_grid`` code exists yet.

    Args:
        strategy: underscore-joined op groups from ``color, crop, cutout, flip, scale, rotate``. Use
            ``"color_crop_cutout_scale_rotate"`` (no flip) for digits (MNIST, SVHN).
        batchwise: broadcast one draw to the whole batch (siamese) instead of one draw per image.
        brightness: brightness shift ``(u - 0.5) * brightness``.
        saturation: saturation factor ``u * saturation``.
        contrast: contrast factor ``u + contrast``.
        crop_ratio: maximal translation as a fraction of the image side (zero fill), rounded to whole pixels.
        cutout_ratio: side of the zeroed hole as a fraction of the image side.
        flip_prob: probability of a horizontal flip.
        scale_ratio: DSA samples a sampling-grid factor ``s ~ U[1/scale_ratio, scale_ratio]`` per axis; the content
            is magnified by ``1/s``.
        rotate_degrees: rotation angle ``~ U[-rotate_degrees, rotate_degrees]``.

    Shape:
        - Input: ``(B, C, H, W)``, any float dtype and value range (never clamped).
        - Output: ``(B, C, H, W)``.

    Example:
        >>> aug = DSA()
        >>> g = torch.Generator().manual_seed(0)
        >>> params = aug.sample(1, g)                                    # one siamese draw
        >>> x_real, x_syn = torch.randn(256, 3, 32, 32), torch.randn(10, 3, 32, 32)
        >>> a_real, a_syn = aug.apply(x_real, params), aug.apply(x_syn, params)
        >>> a_syn.shape
        torch.Size([10, 3, 32, 32])
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        batchwise: bool = True,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        crop_ratio: float = 0.125,
        cutout_ratio: float = 0.5,
        flip_prob: float = 0.5,
        scale_ratio: float = 1.2,
        rotate_degrees: float = 15.0,
    ) -> None:
        super().__init__()
        self.ops = C.parse_ops(strategy, DSA_OPS, "DSA")
        self.strategy = strategy
        self.batchwise = batchwise
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast
        self.crop_ratio = crop_ratio
        self.cutout_ratio = cutout_ratio
        self.flip_prob = flip_prob
        self.scale_ratio = scale_ratio
        self.rotate_degrees = rotate_degrees

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, batchwise={self.batchwise}"

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None
    ) -> AugParams:
        """Draw one op group and its parameters.

        Draws happen on ``generator.device`` and are then moved to ``device``, so a CPU generator gives the same
        parameters whatever device trains.

        Args:
            batch_size: images the parameters are for; ignored when ``batchwise`` (every tensor then has length 1,
                so one draw fits batches of any size).
            generator: the only source of randomness.
            device: where the returned tensors live; ``None`` keeps the generator's device.

        Returns:
            ``{"op": <group name>, ...}`` plus that group's tensors: ``color``: ``brightness`` (shift),
            ``saturation`` and ``contrast`` (factors); ``crop``: ``crop_x``, ``crop_y``; ``cutout``: ``cutout_x``,
            ``cutout_y`` (unit draws in ``[0, 1)``, turned into whole pixels for the image size at ``apply``);
            ``flip``: ``flip`` (bool); ``scale``: ``zoom_x``, ``zoom_y`` (content magnification); ``rotate``:
            ``angle`` (degrees).
        """
        g = C.check_generator(generator)
        n = 1 if self.batchwise else int(batch_size)
        op = self.ops[int(C.randint(g, 1, len(self.ops)).item())]
        params: AugParams = {"op": op}
        if op == "color":
            params["brightness"] = (C.uniform(g, n) - 0.5) * self.brightness
            params["saturation"] = C.uniform(g, n) * self.saturation
            params["contrast"] = C.uniform(g, n) + self.contrast
        elif op == "crop":
            params["crop_x"], params["crop_y"] = C.uniform(g, n), C.uniform(g, n)
        elif op == "cutout":
            params["cutout_x"], params["cutout_y"] = C.uniform(g, n), C.uniform(g, n)
        elif op == "flip":
            params["flip"] = C.uniform(g, n) < self.flip_prob
        elif op == "scale":
            r = self.scale_ratio
            params["zoom_x"] = 1.0 / C.uniform(g, n, 1.0 / r, r)
            params["zoom_y"] = 1.0 / C.uniform(g, n, 1.0 / r, r)
        else:  # rotate
            params["angle"] = C.uniform(g, n, -self.rotate_degrees, self.rotate_degrees)
        return C.to_device(params, device)

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply previously drawn parameters (replay); differentiable with respect to ``x``.

        Args:
            x: images ``(B, C, H, W)``.
            params: a dict from :meth:`sample`; its tensors must have length 1 or ``B``.

        Returns:
            The augmented images.
        """
        op = params["op"]
        _, _, h, w = x.shape
        if op == "color":
            x = AF.brightness(x, params["brightness"])
            x = AF.saturation(x, params["saturation"])
            return AF.contrast(x, params["contrast"])
        if op == "crop":
            # DSA's shift bound: int(side * ratio + 0.5) pixels each way (4 px at 32 px and at 28 px).
            sx, sy = int(w * self.crop_ratio + 0.5), int(h * self.crop_ratio + 0.5)
            shift_x = C.unit_to_int(params["crop_x"], -sx, sx)
            shift_y = C.unit_to_int(params["crop_y"], -sy, sy)
            return AF.translate(x, shift_x, shift_y)
        if op == "cutout":
            size_h, size_w = int(h * self.cutout_ratio + 0.5), int(w * self.cutout_ratio + 0.5)
            # DSA's centre range: {0, ..., side} for even holes, {0, ..., side - 1} for odd ones.
            cx = C.unit_to_int(params["cutout_x"], 0, w - size_w % 2)
            cy = C.unit_to_int(params["cutout_y"], 0, h - size_h % 2)
            return AF.cutout(x, cx, cy, (size_h, size_w))
        if op == "flip":
            return AF.flip(x, params["flip"])
        if op == "scale":
            return AF.scale(x, params["zoom_x"], params["zoom_y"])
        if op == "rotate":
            return AF.rotate(x, params["angle"])
        raise ValueError(f"DSA: unknown op {op!r} in params; known ops: {', '.join(DSA_OPS)}")

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
