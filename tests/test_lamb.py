"""LAMB against a hand computation of optax's update rule and against Adam when the trust ratio is 1."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.optim import LAMB
from lightning_distill.optim import lamb as lamb_mod


def _reference_lamb(p0: list[list[float]], grads: list[list[list[float]]], lr: float, wd: float) -> list[list[float]]:
    """optax.lamb written out element by element in Python floats (β1 .9, β2 .999, eps 1e-6, eps_root 0)."""
    b1, b2, eps = 0.9, 0.999, 1e-6
    params = [list(p) for p in p0]
    m = [[0.0] * len(p) for p in p0]
    v = [[0.0] * len(p) for p in p0]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            m[i] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m[i], g, strict=True)]
            v[i] = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v[i], g, strict=True)]
            u = [
                (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * pi
                for mi, vi, pi in zip(m[i], v[i], params[i], strict=True)
            ]
            p_norm = math.sqrt(sum(x * x for x in params[i]))
            u_norm = math.sqrt(sum(x * x for x in u))
            ratio = 1.0 if p_norm == 0.0 or u_norm == 0.0 else p_norm / u_norm
            params[i] = [pi - lr * ratio * ui for pi, ui in zip(params[i], u, strict=True)]
    return params


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_three_steps_by_hand(wd):
    # Second tensor starts at zero: its first step takes the "norm is 0 -> ratio 1" branch.
    p0 = [[0.5, -1.0, 2.0, 0.25], [0.0, 0.0, 0.0]]
    grads = [
        [[0.1, -0.2, 0.3, 0.0], [1.0, -2.0, 0.5]],
        [[-0.4, 0.1, 0.2, 0.05], [0.3, 0.3, -0.1]],
        [[0.2, 0.2, -0.1, -0.3], [-1.0, 0.5, 2.0]],
    ]
    lr = 0.05
    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in p0]
    opt = LAMB(params, lr=lr, weight_decay=wd)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = _reference_lamb(p0, grads, lr, wd)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), torch.tensor(e, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_lamb_equals_adam_when_trust_ratio_is_one(monkeypatch):
    monkeypatch.setattr(lamb_mod, "_trust_ratio", lambda p_norm, u_norm: torch.ones_like(p_norm))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = torch.randn(5, 3, generator=g, dtype=torch.float64)
    p_lamb = a.clone().requires_grad_(True)
    p_adam = a.clone().requires_grad_(True)
    opt_lamb = LAMB([p_lamb], lr=0.01)
    opt_adam = torch.optim.Adam([p_adam], lr=0.01, betas=(0.9, 0.999), eps=1e-6)
    for _ in range(5):
        for p, opt in ((p_lamb, opt_lamb), (p_adam, opt_adam)):
            opt.zero_grad()
            ((p - target) ** 3).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(p_lamb.detach(), p_adam.detach(), rtol=1e-12, atol=1e-14)


def test_lamb_step_size_is_lr_times_param_norm():
    # With wd 0 the trust ratio rescales the update to norm lr·‖p‖, whatever the gradient scale.
    p = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = LAMB([p], lr=0.1)
    p.grad = torch.tensor([1e-3, -7.0], dtype=torch.float64)
    opt.step()
    assert torch.linalg.vector_norm(p.detach() - torch.tensor([3.0, 4.0], dtype=torch.float64)).item() == (
        pytest.approx(0.5)
    )


def test_lamb_works_with_scheduler_and_state_dict_round_trip():
    def run(steps: int, resume_at: int | None = None) -> torch.Tensor:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
        opt = LAMB([p], lr=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.001)
        for i in range(steps):
            if i == resume_at:
                state = (p.detach().clone(), opt.state_dict(), sched.state_dict())
                p = torch.nn.Parameter(state[0])
                opt = LAMB([p], lr=0.01)
                opt.load_state_dict(state[1])
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.001)
                sched.load_state_dict(state[2])
            opt.zero_grad()
            (p.sin() * torch.arange(6, dtype=torch.float64)).sum().backward()
            opt.step()
            sched.step()
        return p.detach()

    torch.testing.assert_close(run(6), run(6, resume_at=3), rtol=0, atol=0)
