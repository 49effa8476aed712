"""Evaluation of distilled sets: plain functions under registered, recorded protocols."""

# Registers the ``apm`` protocols (and the ``l1_mean`` loss) wherever evaluation is imported.
from lightning_distill.eval import apm_protocol  # noqa: F401
from lightning_distill.eval.continual import (
    ContinualResult,
    ContinualStep,
    class_orders,
    run_continual,
    run_continual_recipe,
    split_classes,
)
from lightning_distill.eval.distilled import evaluate_distilled, test_split_for
from lightning_distill.eval.privacy import PrivacyResult, evaluate_privacy, privacy_sweep, run_attacks
from lightning_distill.eval.protocols import (
    NO_FLIP_DATASETS,
    PROTOCOLS,
    Loss,
    Protocol,
    get_protocol,
    make_augment,
    make_loss,
    make_optimizer,
    make_schedule,
    prepare_labels,
    register_augment,
    register_labels,
    register_loss,
    register_optimizer,
    register_protocol,
    register_schedule,
    training_set,
)
from lightning_distill.eval.train import EvalResult, test_accuracy, train_network, train_on_distilled

__all__ = [
    "ContinualResult",
    "ContinualStep",
    "class_orders",
    "run_continual",
    "run_continual_recipe",
    "split_classes",
    "NO_FLIP_DATASETS",
    "PROTOCOLS",
    "PrivacyResult",
    "EvalResult",
    "Loss",
    "Protocol",
    "evaluate_distilled",
    "evaluate_privacy",
    "get_protocol",
    "make_augment",
    "make_loss",
    "make_optimizer",
    "make_schedule",
    "prepare_labels",
    "privacy_sweep",
    "register_augment",
    "register_labels",
    "register_loss",
    "register_optimizer",
    "register_protocol",
    "register_schedule",
    "run_attacks",
    "test_split_for",
    "test_accuracy",
    "train_network",
    "training_set",
    "train_on_distilled",
]
