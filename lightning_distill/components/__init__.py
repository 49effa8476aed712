"""Stateful helpers shared by methods (held functionally, never registered as submodules)."""

from lightning_distill.components.ema import ParameterEMA
from lightning_distill.components.model_pool import ModelPool, OptimizerFactory
from lightning_distill.components.teachers import TeacherPool, TeacherPoolError, TeacherSpec, load_teacher_pool

__all__ = [
    "ModelPool",
    "OptimizerFactory",
    "ParameterEMA",
    "TeacherPool",
    "TeacherPoolError",
    "TeacherSpec",
    "load_teacher_pool",
]
