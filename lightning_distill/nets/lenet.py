"""LeNet-5 style network from the DC cross-architecture pool."""

from __future__ import annotations

import torch
from torch import nn

from ._common import effective_size, extra_padding
from .registry import register_net


@register_net("lenet")
class LeNet(nn.Module):
    """conv5x5(6) -> ReLU -> maxpool -> conv5x5(16) -> ReLU -> maxpool -> 120 -> 84 -> logits.

    28-px inputs are padded by 2 on the first conv, so 28 and 32 px give the classic 16 x 5 x 5 map.

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length.

    Attributes:
        feature_dim: 84, the width of the last hidden layer.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=extra_padding(image_size)),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        size = ((effective_size(image_size) - 4) // 2 - 4) // 2
        self.hidden = nn.Sequential(nn.Linear(16 * size * size, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.feature_dim: int = 84
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the last hidden activations ``(B, 84)``."""
        features = self.hidden(self.features(x).flatten(1))
        return features if features_only else self.classifier(features)
