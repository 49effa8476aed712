"""Optimisers and schedules that torch.optim lacks."""

from lightning_distill.optim.lamb import LAMB
from lightning_distill.optim.schedules import CosineDecay, HorizonSchedule, StepDecay

__all__ = ["LAMB", "CosineDecay", "HorizonSchedule", "StepDecay"]
