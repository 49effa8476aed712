"""RCIG's convexified inner problem and its analytic last layer (Loo et al., ICML 2023), as pure functions.

On the linearised network (:mod:`lightning_distill.functional.linearize`) with tangent outputs ``U = J δ`` and frozen
features ``Φ`` of the support set (``M`` rows, ``C`` outputs, kernel ``K = ΦΦᵀ``), the last layer ``W`` is eliminated
by a ridge solve with the **absolute** ridge ``λ = l2_rate · N`` (``N`` support images without flips):
``α = (K + λI)⁻¹ (Ỹ − U)``, ``W* = Φᵀα``. What remains is a strongly convex quadratic in δ,

    L_in(δ) = [½‖Ỹ − U − Kα‖² + ½λ tr(αᵀKα) + ½λ‖δ‖²] / (M·C) = λ/(2MC) · [tr(Rᵀ(K + λI)⁻¹R) + ‖δ‖²],  R = Ỹ − U,

(the two forms are equal for the exact α; the second has no cancellation and is what is computed), with gradient
``Hδ − b``, Hessian ``H = λ/(MC) (Jᵀ(K + λI)⁻¹J + I)`` and ``b = λ/(MC) Jᵀ(K + λI)⁻¹Ỹ``. The outer prediction on
real inputs is ``P_t = U_t + K_ts α``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.functional.implicit import implicit_vjp
from lightning_distill.functional.kernels import gram, krr_predict, no_tf32, ridge_solve
from lightning_distill.functional.linearize import (
    JacobianLinearisedNet,
    LinearisedNet,
    head_names,
    linearised_forward,
    tangent_keys,
)
from lightning_distill.functional.losses import label_margin_loss
from lightning_distill.functional.solvers import SolveResult, solve_spd
from lightning_distill.functional.trees import flatten, unflatten

__all__ = [
    "InnerSystem",
    "MetaGradient",
    "SolverSettings",
    "feature_kernel",
    "inner_loss",
    "inner_system",
    "meta_gradient",
    "predict",
    "support_set",
]


def feature_kernel(feats: Tensor) -> Tensor:
    """``K = ΦΦᵀ`` in full float32 (no TF32, no autocast), float64 for float64 features."""
    dtype = feats.dtype if feats.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(device_type=feats.device.type, enabled=False), no_tf32():
        f = feats.flatten(1).to(dtype)
        return gram(f, f)


def inner_loss(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x_sup: Tensor,
    y_sup: Tensor,
    delta: Mapping[str, Tensor],
    ridge: float,
    head: str = "classifier",
) -> Tensor:
    """``L_in(δ; X̃, Ỹ)`` with the last layer eliminated, differentiable w.r.t. ``delta``, ``x_sup`` and ``y_sup``.

    Args:
        net, params, buffers, head: the network at θ0 (see :func:`~lightning_distill.functional.linearised_forward`).
        x_sup: Support inputs ``(M, ...)`` (flips included).
        y_sup: Support targets ``(M, C)``.
        delta: Tangent parameters.
        ridge: The absolute ridge ``λ`` (RCIG: ``l2_rate · N``).

    Returns:
        The scalar inner loss.
    """
    feats, u = linearised_forward(net, params, buffers, x_sup, delta, head)
    r = y_sup - u
    alpha = ridge_solve(feature_kernel(feats), r, ridge)
    m, c = r.shape
    sq = sum(d.pow(2).sum() for d in delta.values())
    return ridge / (2.0 * m * c) * ((r.to(alpha.dtype) * alpha).sum() + sq)


def predict(feats_t: Tensor, u_t: Tensor, feats_s: Tensor, u_s: Tensor, y_sup: Tensor, ridge: float) -> Tensor:
    """The outer prediction ``P_t = U_t + K_ts (K + λI)⁻¹ (Ỹ − U_s)`` (``krr_predict`` with the absolute ridge)."""
    return u_t + krr_predict(feats_s, y_sup - u_s, feats_t, ridge=ridge, relative=False)


class InnerSystem:
    """The inner quadratic on a fixed (detached) support set: ``H v``, ``b`` and ``L_in`` for flat tangents.

    Built once per outer step; each product costs one JVP and one backward of the network on the support set
    (:class:`~lightning_distill.functional.linearize.LinearisedNet`) and one ridge solve of size ``M``. Since the
    linearised model is exactly linear in δ, this ``H`` is the exact Hessian of :func:`inner_loss` (tested against
    forward-over-reverse), at a fraction of the cost.

    Args:
        lin: The linearised network on the support inputs.
        y_sup: Support targets ``(M, C)`` (detached).
        ridge: The absolute ridge ``λ``.
    """

    def __init__(self, lin: LinearisedNet | JacobianLinearisedNet, y_sup: Tensor, ridge: float) -> None:
        self.lin = lin
        self.ridge = float(ridge)
        self.y_sup = y_sup.detach()
        m, c = self.y_sup.shape
        self.scale = self.ridge / (m * c)
        self.kernel = feature_kernel(lin.features)
        alpha_y = ridge_solve(self.kernel, self.y_sup, self.ridge)
        self.b = self.scale * lin.vjp(alpha_y.to(self.y_sup.dtype))
        self.const = 0.5 * self.scale * float((self.y_sup * alpha_y).sum())

    def matvec(self, v: Tensor) -> Tensor:
        """``H v = λ/(MC) (Jᵀ(K + λI)⁻¹ J v + v)``."""
        a = ridge_solve(self.kernel, self.lin.jvp(v), self.ridge).to(v.dtype)
        return self.scale * (self.lin.vjp(a) + v)

    def loss(self, delta: Tensor) -> float:
        """``L_in(δ) = ½δᵀHδ − bᵀδ + const`` for a flat δ."""
        return float(0.5 * torch.dot(delta, self.matvec(delta)) - torch.dot(self.b, delta)) + self.const


def inner_system(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x_sup: Tensor,
    y_sup: Tensor,
    ridge: float,
    head: str = "classifier",
    chunk: int | None = None,
    jacobian_mb: float = 0.0,
) -> InnerSystem:
    """:class:`InnerSystem` of the network at ``params`` on the detached support set ``(x_sup, y_sup)``.

    Args:
        jacobian_mb: Form the Jacobian explicitly (:class:`JacobianLinearisedNet`) when it takes at most this many
            MiB (``M·C·P·4`` bytes); otherwise, or with 0, every product is a JVP and a backward pass. The two give
            the same products (tested); only time and memory differ.
    """
    m, c = y_sup.shape
    body = sum(v.numel() for k, v in params.items() if k not in head_names(head))
    if jacobian_mb > 0 and m * c * body * x_sup.element_size() <= jacobian_mb * 2**20:
        lin: LinearisedNet | JacobianLinearisedNet = JacobianLinearisedNet(
            net, params, buffers, x_sup.detach(), head, chunk
        )
    else:
        lin = LinearisedNet(net, params, buffers, x_sup.detach(), head, chunk)
    return InnerSystem(lin, y_sup, ridge)


#: A function ``(delta, x_sup, y_sup) -> L_in`` (what :func:`~lightning_distill.functional.implicit_vjp` takes).
InnerLoss = Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]


def support_set(x_syn: Tensor, y_syn: Tensor, use_flip: bool) -> tuple[Tensor, Tensor]:
    """The regression support set: the images, plus their horizontal mirrors with the same targets (the flip trick)."""
    if not use_flip:
        return x_syn, y_syn
    return torch.cat([x_syn, torch.flip(x_syn, dims=[-1])]), torch.cat([y_syn, y_syn])


@dataclass(frozen=True)
class SolverSettings:
    """One of RCIG's two solves: the solver's name, its steps, Adam's learning rate, CG's tolerance."""

    method: str = "adam"
    steps: int = 20
    lr: float = 1e-3
    tol: float = 1e-6

    def solve(self, system: InnerSystem, b: Tensor) -> SolveResult:
        """Solve ``H x = b`` on ``system`` from 0."""
        return solve_spd(system.matvec, b, self.method, steps=self.steps, lr=self.lr, tol=self.tol)


@dataclass
class MetaGradient:
    """What :func:`meta_gradient` returns.

    Attributes:
        grads: ``x_syn``, ``y_syn`` (``None`` for fixed labels) and ``log_temperature``: direct + implicit terms.
        direct: the direct terms alone (``x_syn``, ``y_syn``).
        implicit: the implicit terms as added (after clipping; zero where dropped).
        loss: the outer loss (cross-entropy plus the label-margin term).
        logs: scalars worth logging (accuracy on the real batch, norms, solver residuals, clipping).
        inner, hinv: the two solver results (their ``losses`` drive the learning-rate tuning).
        timings: seconds per phase (``inner``, ``direct``, ``hinv``, ``implicit``).
        hinv_rhs: ``∂L_out/∂δ`` at δ*, the right-hand side of the inverse-HVP solve (flat).
    """

    grads: dict[str, Tensor | None]
    direct: dict[str, Tensor | None]
    implicit: dict[str, Tensor | None]
    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)
    inner: SolveResult | None = None
    hinv: SolveResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    hinv_rhs: Tensor | None = None


def _clip_to(g: Tensor | None, ref: Tensor | None) -> tuple[Tensor | None, bool]:
    """Rescale ``g`` so that ``‖g‖ ≤ ‖ref‖`` (RCIG's per-tensor clip of the implicit term); returns (g, clipped)."""
    if g is None or ref is None:
        return g, False
    gn, rn = g.norm(), ref.norm()
    if bool(gn > rn):
        return g * (rn / gn), True
    return g, False


def meta_gradient(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x_syn: Tensor,
    y_syn: Tensor,
    x_real: Tensor,
    y_real: Tensor,
    log_temperature: Tensor,
    ridge: float,
    inner: SolverSettings,
    hinv: SolverSettings,
    use_flip: bool = False,
    label_margin: float | None = None,
    clip_implicit: bool = True,
    head: str = "classifier",
    chunk: int | None = None,
    syn_grad_batch: int | None = None,
    real_grad_batch: int | None = None,
    generator: torch.Generator | None = None,
    jacobian_mb: float = 0.0,
) -> MetaGradient:
    """One RCIG meta-gradient: inner solve, direct gradient, inverse-HVP, implicit term (Loo et al. 2023, §3).

    1. δ* from 0 by ``inner`` on the convex inner loss (support set detached).
    2. The outer loss ``CE(e^τ P_t, y_real) − margin`` with ``P_t = U_t + K_ts α`` on the real batch, differentiated
       w.r.t. the synthetic images and labels *through the analytic last layer* (the direct term), τ, and δ*.
    3. ``v = H⁻¹ ∂L_out/∂δ`` by ``hinv``.
    4. The implicit term ``−∇_S [vᵀ ∇_δ L_in(δ*; S)]``, clipped per tensor to the direct term's norm (and dropped
       if not finite), added to the direct term.

    Args:
        net, params, buffers, head: the network at its base parameters θ0 (eval mode, no running statistics).
        x_syn: Synthetic images ``(N, ...)``; gradients are taken w.r.t. this tensor.
        y_syn: Synthetic regression targets ``(N, C)``; learned when it requires grad (then the margin applies).
        x_real, y_real: The real batch (integer labels).
        log_temperature: The learned log-temperature τ (scalar).
        ridge: The absolute ridge ``λ = l2_rate · N``.
        inner, hinv: The two solves.
        use_flip: Add mirrored copies of the synthetic images to the support set.
        label_margin: Margin of the label term (RCIG: ``1/(2C)``); ``None`` leaves it out.
        clip_implicit: Clip the implicit term per tensor to the direct term's norm.
        chunk: Pass at most this many support images at a time in the solves (memory only, never the result).
        syn_grad_batch: If set and smaller than the support set, the direct pass recomputes only this many random
            support images with gradient and splices them into features computed without gradient for all (RCIG's
            subsampling for large sets: less memory, a subsampled gradient).
        real_grad_batch: The same for the real batch: the tangent outputs of all real images are computed without
            gradient and only this many random ones carry the gradient w.r.t. δ (RCIG's large configurations).
        generator: Draws those subsets.
        jacobian_mb: Form the support set's Jacobian for the solves when it fits this many MiB (see
            :func:`inner_system`; time and memory only).

    Returns:
        The :class:`MetaGradient`.
    """
    t0 = time.perf_counter()
    learned = y_syn.requires_grad
    keys = tangent_keys(params, head)
    x_sup_d, y_sup_d = support_set(x_syn.detach(), y_syn.detach(), use_flip)
    system = inner_system(net, params, buffers, x_sup_d, y_sup_d, ridge, head, chunk, jacobian_mb)
    sol_in = inner.solve(system, system.b)
    t1 = time.perf_counter()

    like = {k: params[k] for k in keys}
    delta = {k: t.detach().clone().requires_grad_(True) for k, t in unflatten(sol_in.x, like, keys).items()}
    with torch.enable_grad():
        x_sup, y_sup = support_set(x_syn, y_syn, use_flip)
        m = len(x_sup)
        if syn_grad_batch is not None and syn_grad_batch < m:
            pick = torch.randperm(m, generator=generator)[:syn_grad_batch].to(x_sup.device)
            feats_all = system.lin.features
            u_all = system.lin.jvp(sol_in.x)
            f_sub, u_sub = linearised_forward(net, params, buffers, x_sup[pick], delta, head)
            feats_s = feats_all.index_copy(0, pick, f_sub)
            u_s = u_all.index_copy(0, pick, u_sub)
        else:
            feats_s, u_s = linearised_forward(net, params, buffers, x_sup, delta, head)
        if real_grad_batch is not None and real_grad_batch < len(x_real):
            pick_t = torch.randperm(len(x_real), generator=generator)[:real_grad_batch].to(x_real.device)
            with torch.no_grad():
                feats_t, u_t = linearised_forward(
                    net, params, buffers, x_real, {k: t.detach() for k, t in delta.items()}, head
                )
            _, u_sub = linearised_forward(net, params, buffers, x_real[pick_t], delta, head)
            u_t = u_t.index_copy(0, pick_t, u_sub)
        else:
            feats_t, u_t = linearised_forward(net, params, buffers, x_real, delta, head)
        pred = predict(feats_t, u_t, feats_s, u_s, y_sup, ridge)
        ce = F.cross_entropy(pred * log_temperature.exp(), y_real)
        loss = ce
        margin = None
        if learned and label_margin is not None:
            margin = label_margin_loss(y_syn, label_margin)
            loss = loss + margin
        wrt = [x_syn, *([y_syn] if learned else []), log_temperature, *delta.values()]
        g = torch.autograd.grad(loss, wrt, allow_unused=True)
    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt, strict=True)]
    g_x, g_y = g[0], (g[1] if learned else None)
    g_tau = g[2 if learned else 1]
    g_delta = flatten(dict(zip(keys, g[-len(keys) :], strict=True)), keys)
    t2 = time.perf_counter()

    sol_h = hinv.solve(system, g_delta.detach())
    t3 = time.perf_counter()

    v = unflatten(sol_h.x, like, keys)

    def loss_in(d: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        xs_sup, ys_sup = support_set(xs, ys, use_flip)
        return inner_loss(net, params, buffers, xs_sup, ys_sup, d, ridge, head)

    x_leaf = x_syn.detach().requires_grad_(True)
    y_leaf = y_syn.detach().requires_grad_(learned)
    imp_x, imp_y = implicit_vjp(loss_in, {k: t.detach() for k, t in delta.items()}, v, [x_leaf, y_leaf])
    t4 = time.perf_counter()

    logs: dict[str, float] = {
        "ce": float(ce.detach()),
        "acc": float((pred.detach().argmax(1) == y_real).float().mean()),
        "temperature": float(log_temperature.detach().exp()),
        "inner_loss_start": sol_in.losses[0] + system.const if sol_in.losses else float("nan"),
        "inner_loss": sol_in.losses[-1] + system.const if sol_in.losses else float("nan"),
        "inner_residual": sol_in.residual,
        "hinv_residual": sol_h.residual,
    }
    if margin is not None:
        logs["label_margin"] = float(margin.detach())
    dropped = 0.0
    clipped = 0.0
    direct = {"x_syn": g_x, "y_syn": g_y}
    implicit: dict[str, Tensor | None] = {}
    for name, imp in (("x_syn", imp_x), ("y_syn", imp_y)):
        ref = direct[name]
        if imp is None or ref is None:
            implicit[name] = None
            continue
        logs[f"implicit_ratio_{name[0]}"] = float(imp.norm() / ref.norm().clamp_min(1e-30))
        if not bool(torch.isfinite(imp).all()):
            implicit[name] = torch.zeros_like(imp)
            dropped += 1
            continue
        if clip_implicit:
            imp, was = _clip_to(imp, ref)
            clipped += float(was)
        implicit[name] = imp
    logs["implicit_clipped"] = clipped
    logs["implicit_dropped"] = dropped
    grads: dict[str, Tensor | None] = {
        "x_syn": g_x + implicit["x_syn"] if implicit["x_syn"] is not None else g_x,
        "y_syn": None if g_y is None else (g_y + implicit["y_syn"] if implicit["y_syn"] is not None else g_y),
        "log_temperature": g_tau,
    }
    timings = {"inner": t1 - t0, "direct": t2 - t1, "hinv": t3 - t2, "implicit": t4 - t3}
    return MetaGradient(grads, direct, implicit, loss.detach(), logs, sol_in, sol_h, timings, g_delta.detach())
