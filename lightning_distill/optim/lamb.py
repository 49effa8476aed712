"""LAMB with optax semantics (the outer optimiser of FRePo)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LAMB"]


def _trust_ratio(param_norm: Tensor, update_norm: Tensor) -> Tensor:
    """``‖p‖/‖u‖``, or 1 when either norm is zero (optax ``scale_by_trust_ratio``); stays on device, no sync."""
    zero = (param_norm == 0) | (update_norm == 0)
    safe_update_norm = torch.where(zero, torch.ones_like(update_norm), update_norm)
    return torch.where(zero, torch.ones_like(param_norm), param_norm / safe_update_norm)


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments (You et al., 2020) with the semantics of ``optax.lamb``.

    Per tensor ``p`` with gradient ``g`` at step ``t``::

        m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
        u = m̂ / (sqrt(v̂ + eps_root) + eps) + weight_decay·p      (m̂, v̂ bias-corrected)
        r = ‖p‖ / ‖u‖  (1 when either norm is 0)
        p ← p − lr·r·u

    The trust ratio is per tensor (Frobenius norms over the whole tensor), so for a distillation run the synthetic
    images form one tensor and the learned labels another, as in FRePo. The learning rate lives in
    ``param_groups`` so any ``torch.optim.lr_scheduler`` (e.g. cosine) drives it.

    Args:
        params: Tensors or parameter groups to optimise.
        lr: Learning rate.
        betas: Decay rates ``(β1, β2)`` of the first and second moments.
        eps: Added to ``sqrt(v̂)`` (optax default 1e-6).
        eps_root: Added to ``v̂`` inside the square root (optax default 0).
        weight_decay: Decoupled weight decay added to the update before the trust ratio (optax default 0).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        eps_root: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0.0 or eps_root < 0.0 or weight_decay < 0.0:
            raise ValueError("eps, eps_root and weight_decay must be non-negative")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, if given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    # The step count lives on the CPU so bias corrections never force a device sync.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                m_hat = exp_avg / (1.0 - beta1**t)
                v_hat = exp_avg_sq / (1.0 - beta2**t)
                update = m_hat / ((v_hat + group["eps_root"]).sqrt() + group["eps"])
                if group["weight_decay"] != 0.0:
                    update.add_(p, alpha=group["weight_decay"])
                ratio = _trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(update))
                p.sub_(update * (ratio * group["lr"]))
        return loss
