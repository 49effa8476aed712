"""Pure maths on tensors and parameter dicts: no Lightning import, no global RNG."""

from lightning_distill.functional.apm import apm_gradients, apm_loss, l1_discrepancy, stack_checkpoints, stacked_logits
from lightning_distill.functional.implicit import hvp, implicit_vjp
from lightning_distill.functional.kernels import gram, krr_predict, no_tf32, ridge_solve
from lightning_distill.functional.kmeans import kmeans_pp_starts, lloyd, squared_distances
from lightning_distill.functional.linearize import JacobianLinearisedNet, LinearisedNet, linearised_forward
from lightning_distill.functional.losses import centred_one_hot, frepo_label_init_scale, half_mse, label_margin_loss
from lightning_distill.functional.solvers import SolveResult, adam_quadratic, conjugate_gradient, solve_spd
from lightning_distill.functional.unroll import (
    UnrollTrace,
    reverse_sgd,
    unroll_hypergradient,
    unroll_sgd,
    unroll_sgd_naive,
)

__all__ = [
    "JacobianLinearisedNet",
    "LinearisedNet",
    "SolveResult",
    "UnrollTrace",
    "adam_quadratic",
    "apm_gradients",
    "apm_loss",
    "centred_one_hot",
    "conjugate_gradient",
    "frepo_label_init_scale",
    "gram",
    "half_mse",
    "hvp",
    "implicit_vjp",
    "kmeans_pp_starts",
    "krr_predict",
    "l1_discrepancy",
    "label_margin_loss",
    "linearised_forward",
    "lloyd",
    "no_tf32",
    "reverse_sgd",
    "ridge_solve",
    "solve_spd",
    "squared_distances",
    "stack_checkpoints",
    "stacked_logits",
    "unroll_hypergradient",
    "unroll_sgd",
    "unroll_sgd_naive",
]
