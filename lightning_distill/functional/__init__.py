"""Pure maths on tensors and parameter dicts: no Lightning import, no global RNG."""

from lightning_distill.functional.apm import apm_gradients, apm_loss, l1_discrepancy, stack_checkpoints, stacked_logits
from lightning_distill.functional.kernels import gram, krr_predict, no_tf32
from lightning_distill.functional.losses import centred_one_hot, frepo_label_init_scale, half_mse, label_margin_loss
from lightning_distill.functional.unroll import (
    UnrollTrace,
    reverse_sgd,
    unroll_hypergradient,
    unroll_sgd,
    unroll_sgd_naive,
)

__all__ = [
    "apm_gradients",
    "apm_loss",
    "l1_discrepancy",
    "stack_checkpoints",
    "stacked_logits",
    "UnrollTrace",
    "centred_one_hot",
    "frepo_label_init_scale",
    "gram",
    "half_mse",
    "krr_predict",
    "label_margin_loss",
    "no_tf32",
    "reverse_sgd",
    "unroll_hypergradient",
    "unroll_sgd",
    "unroll_sgd_naive",
]
