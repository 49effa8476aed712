"""``seeded_net``: a freshly initialised network whose weights depend on one seed and nothing else."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def seeded_net(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` with the global CPU generator seeded by ``seed``, leaving the global RNG as it was.

    ``nn.init`` draws from the global CPU generator, so the same seed gives the same weights on any machine, and the
    caller's random stream (augmentation, data order) is untouched. The factory must build on the CPU; move the
    network afterwards.

    Args:
        factory: returns a new network (e.g. ``lambda: get_net("convnet", 1, 10, 28)``).
        seed: the seed of its initialisation (any non-negative integer below 2**63).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        return factory()
