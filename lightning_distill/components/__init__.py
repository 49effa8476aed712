"""Stateful helpers shared by methods (held functionally, never registered as submodules)."""

from lightning_distill.components.model_pool import ModelPool

__all__ = ["ModelPool"]
