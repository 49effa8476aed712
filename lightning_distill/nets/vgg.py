"""VGG-11 for small images, with the DC code's "instance" norm (GroupNorm(C, C)) by default."""

from __future__ import annotations

import torch
from torch import nn

from ._common import NORMS, Norm, check_choice, effective_size, extra_padding, make_norm
from .registry import register_net

# Channel counts at width 64; "M" is a 2x2 max pool.
_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_net("vgg11")
class VGG11(nn.Module):
    """VGG-11: eight conv3x3 -> norm -> ReLU layers and five 2x2 max pools, then one linear layer.

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length (28 is treated as 32 by padding the first conv by 3).
        width: Channels of the first conv (64 in VGG-11); the others scale proportionally.
        norm: "instance" (``GroupNorm(C, C)``), "batch" or "none".

    Attributes:
        feature_dim: Size of the flattened features fed to the final linear layer (512 at 32 px).
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: int = 64, norm: Norm = "instance"
    ) -> None:
        super().__init__()
        check_choice(norm, NORMS, "norm")
        layers: list[nn.Module] = []
        channels, size, first = in_channels, effective_size(image_size), True
        for item in _VGG11_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            out_channels = int(item) * width // 64
            padding = 1 + (extra_padding(image_size) if first else 0)
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=padding))
            if norm != "none":
                layers.append(make_norm(norm, out_channels))
            layers.append(nn.ReLU())
            channels, first = out_channels, False
        self.features = nn.Sequential(*layers)
        self.feature_dim: int = channels * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the flattened features ``(B, feature_dim)``."""
        features = self.features(x).flatten(1)
        return features if features_only else self.classifier(features)
