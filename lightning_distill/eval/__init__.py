"""Evaluation of distilled sets: plain functions under named protocols."""

from lightning_distill.eval.distilled import evaluate_distilled, test_split_for
from lightning_distill.eval.protocols import NO_FLIP_DATASETS, PROTOCOLS, Protocol, get_protocol
from lightning_distill.eval.train import EvalResult, test_accuracy, train_on_distilled

__all__ = [
    "NO_FLIP_DATASETS",
    "PROTOCOLS",
    "EvalResult",
    "Protocol",
    "evaluate_distilled",
    "get_protocol",
    "test_split_for",
    "test_accuracy",
    "train_on_distilled",
]
