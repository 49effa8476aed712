"""Small building blocks shared by the network definitions (not public API)."""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

Norm = Literal["instance", "batch", "none"]
Activation = Literal["relu", "softplus", "leaky_relu", "sigmoid"]

NORMS = ("instance", "batch", "none")
ACTIVATIONS = ("relu", "softplus", "leaky_relu", "sigmoid")

# std of a unit normal truncated to [-2, 2]; Flax divides by it so the truncated weights keep variance 1/fan_in.
_TRUNC_STD = 0.87962566103423978


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ValueError when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def effective_size(image_size: int) -> int:
    """Side length seen after the first conv: 28-px inputs are padded to 32 as in the DC/FRePo code."""
    return 32 if image_size == 28 else image_size


def extra_padding(image_size: int) -> int:
    """Extra zero padding per side on the first conv that turns a 28-px input into a 32-px feature map."""
    return (effective_size(image_size) - image_size) // 2


def depth_for_resolution(image_size: int) -> int:
    """The usual ConvNet depth: 3 up to 32 px, 4 up to 64 px, 5 above (so the last map is 4x4 at 32/64/128)."""
    if image_size <= 32:
        return 3
    if image_size <= 64:
        return 4
    return 5


def make_norm(kind: str, channels: int, bn_momentum: float = 0.1) -> nn.Module:
    """Build a normalisation layer.

    "instance" is ``GroupNorm(C, C)`` as in the DC code: per-sample statistics and no running buffers, which
    keeps the net usable under ``torch.func.vmap``. "none" gives ``nn.Identity``.
    """
    check_choice(kind, NORMS, "norm")
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=bn_momentum)
    return nn.Identity()


def make_activation(kind: str, softplus_beta: float = 1.0) -> nn.Module:
    """Build an activation; "softplus" is softplus(beta * x) / beta (a smooth ReLU for large beta)."""
    check_choice(kind, ACTIVATIONS, "activation")
    if kind == "relu":
        return nn.ReLU()
    if kind == "softplus":
        return nn.Softplus(beta=softplus_beta)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01)
    return nn.Sigmoid()


def lecun_normal_(module: nn.Module) -> None:
    """Re-initialise every Conv2d/Linear like Flax's defaults: truncated LeCun normal kernels, zero biases.

    Weights are drawn from N(0, s^2) truncated to +-2s with s = sqrt(1/fan_in) / 0.8796, so their variance is
    exactly 1/fan_in. Uses the global torch RNG, like PyTorch's own default init.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
