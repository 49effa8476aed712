"""Name -> constructor registry for the networks used inside and after distillation.

Every registered constructor is called as ``factory(in_channels=..., num_classes=..., image_size=..., **kwargs)``
and must return an ``nn.Module`` that follows the project's network contract:

* ``net(x)`` returns logits of shape ``(B, num_classes)``;
* ``net(x, features_only=True)`` returns the flattened features right before the final linear layer, shape
  ``(B, net.feature_dim)``;
* it works with ``torch.func.functional_call`` (and with ``torch.func.vmap`` over stacked parameters where it
  keeps no running statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_net(name: str) -> Callable[[F], F]:
    """Register a network constructor under ``name``.

    Args:
        name: The registry key, e.g. ``"convnet"``.

    Returns:
        A decorator that records the constructor (a class or a function) and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered; silently replacing a net would change which architecture
            an existing config trains.
    """

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"a net named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def get_net(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: A registered name (see :func:`list_nets`).
        in_channels: Number of input channels (1 for MNIST-like data, 3 for colour images).
        num_classes: Number of output logits.
        image_size: Side length of the square input images (28, 32, 64, ...).
        **kwargs: Extra keyword arguments for the constructor, e.g. ``width=64`` or ``norm="none"``.

    Returns:
        The network, with a ``feature_dim`` attribute.

    Raises:
        ValueError: If ``name`` is not registered.
        TypeError: If the constructor returned a module without an integer ``feature_dim``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown net {name!r}; known nets: {', '.join(list_nets())}")
    net = _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    # Catch contract violations at build time rather than deep inside a method's feature extraction.
    if not isinstance(getattr(net, "feature_dim", None), int):
        raise TypeError(f"net {name!r} does not set an integer `feature_dim` attribute")
    return net


def list_nets() -> list[str]:
    """Return the registered network names, sorted."""
    return sorted(_REGISTRY)
