"""Network registry and architectures (ConvNet family, AlexNet, VGG-11, ResNet-18, LeNet, MLP).

Importing this package registers every built-in network.
"""

from __future__ import annotations

# The architecture modules register themselves on import; keep these imports even though names go unused.
from . import alexnet, convnet, lenet, mlp, resnet, vgg  # noqa: F401
from .convnet import ConvNet
from .registry import get_net, list_nets, register_net
from .seeded import seeded_net

__all__ = ["ConvNet", "get_net", "list_nets", "register_net", "seeded_net"]
