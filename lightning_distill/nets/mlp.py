"""Two-hidden-layer MLP from the DC cross-architecture pool."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_net


@register_net("mlp")
class MLP(nn.Module):
    """Flatten -> Linear(width) -> ReLU -> Linear(width) -> ReLU -> Linear(num_classes).

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length (no padding: the pixels are flattened as they are).
        width: Hidden width (128).

    Attributes:
        feature_dim: The hidden width.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.feature_dim: int = width
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the last hidden activations ``(B, width)``."""
        features = self.hidden(x)
        return features if features_only else self.classifier(features)
