"""Iterative solvers for symmetric positive-definite systems ``H x = b`` given only ``v ↦ H v``.

RCIG solves two such systems per outer step with a Hessian it never forms: the inner problem (the tangent
parameters δ*) and the inverse-Hessian-vector product ``H⁻¹ g``. Both are minimisations of the quadratic
``q(x) = ½ xᵀ H x − bᵀ x`` from ``x = 0``, so the same solvers serve both, chosen by name:

* ``"adam"``: the paper's choice: a fixed number of Adam steps at a fixed learning rate on ``q`` (robust to the bad
  conditioning of RCIG's Hessians, whose smallest eigenvalue is the ridge; it does not converge to the exact
  solution in few steps, which is the point: it is the truncated solve the paper uses);
* ``"cg"``: conjugate gradient, with a relative tolerance and a step cap (exact in at most ``dim`` steps in exact
  arithmetic; the reference the Adam solve is checked against).

Vectors are flat 1-D tensors (see :func:`lightning_distill.functional.trees.flatten`). Written by hand: the solvers
live inside a meta-gradient computation where torch.optim's in-place parameter updates and state would be in the
way, and each is a few lines. No Lightning import, no global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SOLVERS", "SolveResult", "adam_quadratic", "conjugate_gradient", "solve_spd"]

MatVec = Callable[[Tensor], Tensor]


@dataclass
class SolveResult:
    """What a solver returns.

    Attributes:
        x: the (approximate) solution.
        losses: ``q(x)`` at each iterate, starting with ``q(x0)`` (``len = steps + 1``); the monotone-decrease check
            of RCIG's learning-rate tuning reads it.
        steps: matrix-vector products spent.
        residual: ``‖H x − b‖ / ‖b‖`` at the last iterate that was evaluated (the gradient of ``q`` there).
    """

    x: Tensor
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    residual: float = float("nan")

    @property
    def monotone(self) -> bool:
        """Whether ``q`` decreased at every step (RCIG's criterion for a learning rate that is not too large)."""
        return all(b < a for a, b in zip(self.losses, self.losses[1:], strict=False))

    @property
    def increased(self) -> bool:
        """Whether the run ended above its starting value."""
        return len(self.losses) > 1 and self.losses[-1] > self.losses[0]


def _q(x: Tensor, hx: Tensor, b: Tensor) -> float:
    # q = ½ xᵀHx − bᵀx, from the product the step computes anyway.
    return float(0.5 * torch.dot(x, hx) - torch.dot(b, x))


def adam_quadratic(
    matvec: MatVec,
    b: Tensor,
    steps: int = 20,
    lr: float = 1e-3,
    x0: Tensor | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> SolveResult:
    """Minimise ``q(x) = ½ xᵀHx − bᵀx`` by ``steps`` Adam steps (gradient ``Hx − b``) from ``x0`` (default 0).

    Adam as in optax/torch (bias-corrected moments, ``eps`` outside the square root), with fresh moments.

    Args:
        matvec: ``v ↦ H v`` for a symmetric positive-definite ``H``.
        b: Right-hand side (flat).
        steps: Adam steps (RCIG: 20 for both solves).
        lr: Learning rate (RCIG tunes it before training).
        x0: Start (RCIG: 0).
        betas: Adam moment decay rates.
        eps: Adam epsilon.

    Returns:
        The :class:`SolveResult`; ``losses`` has ``q`` before every step and after the last.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    m = torch.zeros_like(b)
    s = torch.zeros_like(b)
    losses: list[float] = []
    b1, b2 = betas
    grad = None
    for t in range(1, steps + 1):
        hx = matvec(x)
        grad = hx - b
        losses.append(_q(x, hx, b))
        m.mul_(b1).add_(grad, alpha=1 - b1)
        s.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1**t)
        s_hat = s / (1 - b2**t)
        x = x - lr * m_hat / (s_hat.sqrt() + eps)
    hx = matvec(x)
    grad = hx - b
    losses.append(_q(x, hx, b))
    bn = float(b.norm())
    return SolveResult(x, losses, steps + 1, float(grad.norm()) / bn if bn > 0 else float(grad.norm()))


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    steps: int = 100,
    tol: float = 1e-6,
    x0: Tensor | None = None,
) -> SolveResult:
    """Conjugate gradient for ``H x = b``, stopping at ``‖Hx − b‖ ≤ tol·‖b‖`` or after ``steps`` products.

    Args:
        matvec: ``v ↦ H v`` for a symmetric positive-definite ``H``.
        b: Right-hand side (flat).
        steps: Cap on the iterations.
        tol: Relative residual tolerance.
        x0: Start (default 0).

    Returns:
        The :class:`SolveResult` (``losses`` holds ``q`` at every iterate).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    bn = float(b.norm())
    if bn == 0.0:
        return SolveResult(torch.zeros_like(b), [0.0], 0, 0.0)
    hx = torch.zeros_like(b) if x0 is None else matvec(x)
    r = b - hx
    p = r.clone()
    rs = torch.dot(r, r)
    losses = [_q(x, hx, b)]
    used = 0 if x0 is None else 1
    for _ in range(steps):
        if float(rs.sqrt()) <= tol * bn:
            break
        hp = matvec(p)
        used += 1
        alpha = rs / torch.dot(p, hp)
        x = x + alpha * p
        hx = hx + alpha * hp
        r = r - alpha * hp
        losses.append(_q(x, hx, b))
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return SolveResult(x, losses, used, float(rs.sqrt()) / bn)


#: Solvers by the name a recipe gives (``inner_solver``, ``hinv_solver``).
SOLVERS = {"adam": adam_quadratic, "cg": conjugate_gradient}


def solve_spd(
    matvec: MatVec, b: Tensor, method: str = "adam", steps: int = 20, lr: float = 1e-3, tol: float = 1e-6
) -> SolveResult:
    """Solve ``H x = b`` from 0 with the solver named ``method`` (adam: ``steps``, ``lr``; cg: ``steps``, ``tol``).

    Raises:
        ValueError: For an unknown solver name.
    """
    if method == "adam":
        return adam_quadratic(matvec, b, steps=steps, lr=lr)
    if method == "cg":
        return conjugate_gradient(matvec, b, steps=steps, tol=tol)
    raise ValueError(f"unknown solver {method!r}: choose one of {', '.join(SOLVERS)}")
