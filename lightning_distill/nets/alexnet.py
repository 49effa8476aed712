"""AlexNet in the small-image form of the DC cross-architecture pool."""

from __future__ import annotations

import torch
from torch import nn

from ._common import effective_size, extra_padding
from .registry import register_net


@register_net("alexnet")
class AlexNet(nn.Module):
    """Five convs (5x5, 5x5, 3x3, 3x3, 3x3) with ReLU and three 2x2 max pools, then one linear layer.

    Channels are 128, 192, 256, 192, 192 at the default ``width=128`` and scale with it. A 28-px input gets 2 extra
    pixels of padding on the first conv, so it is processed as 32 px.

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length (28 is treated as 32).
        width: Channels of the first conv; the others scale proportionally.

    Attributes:
        feature_dim: Size of the flattened features fed to the final linear layer.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        c1, c2, c3 = width, width * 3 // 2, width * 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2 + extra_padding(image_size)),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c3, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        size = effective_size(image_size) // 8
        self.feature_dim: int = c2 * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the flattened features ``(B, feature_dim)``."""
        features = self.features(x).flatten(1)
        return features if features_only else self.classifier(features)
