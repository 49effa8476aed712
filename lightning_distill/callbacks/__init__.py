"""Callbacks (one per file)."""

from lightning_distill.callbacks.continual import ContinualLearningEval
from lightning_distill.callbacks.cross_arch import CrossArchitectureEval
from lightning_distill.callbacks.export import ExportDistilled
from lightning_distill.callbacks.image_logger import SyntheticImageLogger
from lightning_distill.callbacks.time_budget import TimeBudget

__all__ = ["ContinualLearningEval", "CrossArchitectureEval", "ExportDistilled", "SyntheticImageLogger", "TimeBudget"]
