"""The ConvNet family used by DC/DSA/DM/MTT (width 128, instance norm) and by FRePo/RCIG (doubling widths)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ._common import (
    ACTIVATIONS,
    NORMS,
    Activation,
    Norm,
    check_choice,
    depth_for_resolution,
    effective_size,
    extra_padding,
    lecun_normal_,
    make_activation,
    make_norm,
)
from .registry import register_net


class ConvNet(nn.Module):
    """A stack of ``depth`` conv blocks followed by one linear layer.

    Default block (DC): conv3x3 (pad 1) -> norm -> activation -> 2x2 pool. With ``norm_before_conv`` (FRePo) the
    block is norm -> conv -> activation -> pool, and block 1 has no norm. A 28-px input is padded by 3 in the first
    conv so the network sees 32 px, as the papers do.

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length (28 is treated as 32).
        width: Channels of block 1 (and of every block unless ``double_width``).
        depth: Number of conv blocks.
        norm: "instance" (``GroupNorm(C, C)``, no running stats), "batch" or "none".
        activation: "relu", "softplus", "leaky_relu" or "sigmoid".
        softplus_beta: beta of softplus(beta * x) / beta; RCIG uses 60.
        pooling: "avg", "max" or "none" (2x2, stride 2).
        double_width: If True, block i (0-based) has ``width * 2**i`` channels (FRePo/RCIG).
        norm_before_conv: If True, put the norm before the conv in blocks 2..depth and none in block 1 (FRePo).
        bn_momentum: PyTorch BatchNorm momentum (weight of the new batch statistic).
        init: "torch" (PyTorch defaults) or "lecun" (truncated LeCun normal, zero bias: Flax defaults).

    Attributes:
        feature_dim: Size of the flattened features fed to the final linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: Norm = "instance",
        activation: Activation = "relu",
        softplus_beta: float = 1.0,
        pooling: Literal["avg", "max", "none"] = "avg",
        double_width: bool = False,
        norm_before_conv: bool = False,
        bn_momentum: float = 0.1,
        init: Literal["torch", "lecun"] = "torch",
    ) -> None:
        super().__init__()
        check_choice(norm, NORMS, "norm")
        check_choice(activation, ACTIVATIONS, "activation")
        check_choice(pooling, ("avg", "max", "none"), "pooling")
        check_choice(init, ("torch", "lecun"), "init")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        size = effective_size(image_size)
        channels = in_channels
        blocks: list[nn.Module] = []
        for i in range(depth):
            out_channels = width * 2**i if double_width else width
            padding = 1 + (extra_padding(image_size) if i == 0 else 0)
            layers: list[nn.Module] = []
            if norm_before_conv:
                # FRePo normalises the input of blocks 2..D; normalising raw pixels in block 1 is left out.
                if i > 0 and norm != "none":
                    layers.append(make_norm(norm, channels, bn_momentum))
                layers.append(nn.Conv2d(channels, out_channels, 3, padding=padding))
            else:
                layers.append(nn.Conv2d(channels, out_channels, 3, padding=padding))
                if norm != "none":
                    layers.append(make_norm(norm, out_channels, bn_momentum))
            layers.append(make_activation(activation, softplus_beta))
            if pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim: int = channels * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        if init == "lecun":
            lecun_normal_(self)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the flattened features ``(B, feature_dim)``."""
        features = self.blocks(x).flatten(1)
        return features if features_only else self.classifier(features)


@register_net("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, depth: int | None = None, **kwargs: Any) -> ConvNet:
    """DC/DSA/DM/MTT ConvNet: width 128, instance norm, ReLU, average pooling; depth 3/4/5 at 32/64/128 px."""
    depth = depth_for_resolution(image_size) if depth is None else depth
    return ConvNet(in_channels, num_classes, image_size, depth=depth, **kwargs)


@register_net("convnet_frepo")
def convnet_frepo(
    in_channels: int, num_classes: int, image_size: int, depth: int | None = None, **kwargs: Any
) -> ConvNet:
    """FRePo pool ConvNet: doubling widths, BatchNorm before the conv in blocks 2..D, LeCun init.

    ``bn_momentum`` defaults to 0.9: Flax's momentum 0.1 (running = 0.1 * old + 0.9 * batch) is PyTorch's 0.9.
    The FRePo/RCIG evaluation ("krr" protocol) net is this one with ``norm="none"``.
    """
    depth = depth_for_resolution(image_size) if depth is None else depth
    options: dict[str, Any] = {
        "double_width": True,
        "norm": "batch",
        "norm_before_conv": True,
        "init": "lecun",
        "bn_momentum": 0.9,
    }
    options.update(kwargs)
    return ConvNet(in_channels, num_classes, image_size, depth=depth, **options)


@register_net("convnet_rcig")
def convnet_rcig(
    in_channels: int, num_classes: int, image_size: int, depth: int | None = None, **kwargs: Any
) -> ConvNet:
    """RCIG distillation ConvNet: doubling widths, no norm, LeCun init.

    The activation defaults to softplus with beta 60 at depth 3 (smooth, so Hessians are meaningful) and to ReLU
    at depth 4/5, following RCIG's configs. RCIG evaluates with ReLU: pass ``activation="relu"``.
    """
    depth = depth_for_resolution(image_size) if depth is None else depth
    options: dict[str, Any] = {"double_width": True, "norm": "none", "init": "lecun"}
    if depth == 3:
        options.update(activation="softplus", softplus_beta=60.0)
    options.update(kwargs)
    return ConvNet(in_channels, num_classes, image_size, depth=depth, **options)
