"""ResNet-18 in the CIFAR-style variant used by the distillation papers' cross-architecture pools."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import NORMS, Norm, check_choice, extra_padding, make_norm
from .registry import register_net


class BasicBlock(nn.Module):
    """Two conv3x3 -> norm layers with an identity (or 1x1 conv -> norm) shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        # Convs carry a bias only when no norm follows (a norm's shift makes the bias redundant).
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias), make_norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_net("resnet18")
class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max pool, BasicBlocks [2, 2, 2, 2], global average pooling.

    Global average pooling makes the feature size independent of the resolution, so 28/32/64 px all work; 28-px
    inputs are padded to 32 by the stem.

    Args:
        in_channels: Input channels.
        num_classes: Number of logits.
        image_size: Input side length.
        width: Channels of the stem and stage 1 (64); stages double it.
        norm: "instance" (``GroupNorm(C, C)``, the DC default), "batch" or "none".

    Attributes:
        feature_dim: Size of the pooled features fed to the final linear layer (8 * width).
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: int = 64, norm: Norm = "instance"
    ) -> None:
        super().__init__()
        check_choice(norm, NORMS, "norm")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1 + extra_padding(image_size), bias=norm == "none"),
            make_norm(norm, width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = width
        for i in range(4):
            out_channels = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride, norm), BasicBlock(out_channels, out_channels, 1, norm)
                )
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.feature_dim: int = channels
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Return logits ``(B, num_classes)``, or the pooled features ``(B, feature_dim)``."""
        features = self.stages(self.stem(x)).mean(dim=(2, 3))
        return features if features_only else self.classifier(features)
