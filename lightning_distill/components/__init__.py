"""Stateful helpers shared by methods (held functionally, never registered as submodules)."""

from lightning_distill.components.model_pool import ModelPool, OptimizerFactory

__all__ = ["ModelPool", "OptimizerFactory"]
