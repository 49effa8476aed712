"""Optimisers that torch.optim lacks."""

from lightning_distill.optim.lamb import LAMB

__all__ = ["LAMB"]
