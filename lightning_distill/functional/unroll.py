"""Unrolled SGD with momentum on a functional network, and its exact, memory-efficient reverse pass.

The inner optimiser is PyTorch's SGD with momentum (no dampening, no Nesterov), with optional L2 weight decay::

    g_t     = ∇_w ℓ(w_t, batch_t(θ)) + λ w_t
    v_{t+1} = μ v_t + g_t                 (v_0 = 0)
    w_{t+1} = w_t − η v_{t+1}

where ``batch_t(θ)`` builds step ``t``'s inner batch from the meta-parameters ``θ`` (a synthetic set's pixels, or a
memory's bases and coefficients; augmentation included). :func:`unroll_sgd` runs the ``T`` steps without any
autograd graph and keeps only the weights ``w_0 .. w_{T-1}`` (optionally on the CPU). :func:`reverse_sgd` then walks
back from ``∂L/∂w_T``, rebuilding one step's graph at a time (Maclaurin et al. 2015, Alg. 2, with stored weights
instead of exact-reversible arithmetic), so memory is ``T`` weight copies plus one step's graph, and the
hyper-gradient is exact through momentum. :func:`unroll_sgd_naive` is the ``create_graph`` unroll it is tested
against (memory grows with every step's activations).

``batch_fn(t, meta)`` must give the same batch for the same ``t`` every time it is called (it is called once per step
in each pass): draw the step's indices and augmentation parameters beforehand and replay them.

Pure functions: no Lightning, no global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: ``loss_fn(params, x, y) -> scalar``: the inner loss of the network with weights ``params`` on one batch.
InnerLoss = Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]
#: ``batch_fn(t, meta) -> (x, y)``: step ``t``'s inner batch built from the meta-parameters (deterministic in ``t``).
BatchFn = Callable[[int, dict[str, Tensor]], tuple[Tensor, Tensor]]

__all__ = [
    "BatchFn",
    "InnerLoss",
    "UnrollTrace",
    "reverse_sgd",
    "unroll_hypergradient",
    "unroll_sgd",
    "unroll_sgd_naive",
]


@dataclass
class UnrollTrace:
    """What :func:`unroll_sgd` keeps for the reverse pass.

    Attributes:
        params: the final weights ``w_T`` (detached, on the compute device).
        momentum: the final momentum buffers ``v_T`` (detached).
        snapshots: ``w_0 .. w_{T-1}`` (detached, on ``snapshot_device``); ``T`` entries.
        losses: the inner loss at each step (floats).
        lr, momentum_coef, weight_decay: the inner optimiser's settings, which the reverse pass must reuse.
    """

    params: dict[str, Tensor]
    momentum: dict[str, Tensor]
    snapshots: list[dict[str, Tensor]]
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    momentum_coef: float = 0.0
    weight_decay: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.snapshots)

    def snapshot_bytes(self) -> int:
        """Bytes held by the weight snapshots."""
        return sum(t.numel() * t.element_size() for s in self.snapshots for t in s.values())


def _check(steps: int, lr: float, momentum: float, weight_decay: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (inner SGD steps), got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive (inner SGD learning rate), got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")


def _detached(meta: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in meta.items()}


def unroll_sgd(
    loss_fn: InnerLoss,
    params: dict[str, Tensor],
    batch_fn: BatchFn,
    meta: dict[str, Tensor],
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    snapshot_device: torch.device | str | None = None,
) -> UnrollTrace:
    """Run ``steps`` SGD-with-momentum steps without an autograd graph, keeping the weight before each step.

    Args:
        loss_fn: inner loss ``loss_fn(params, x, y)`` (a ``torch.func.functional_call`` of the network).
        params: initial weights ``w_0`` by name (the network's trainable parameters; buffers belong in ``loss_fn``).
        batch_fn: ``batch_fn(t, meta)`` gives step ``t``'s batch; called with detached ``meta`` here.
        meta: the meta-parameters the batches are built from.
        steps: ``T``, the number of inner steps.
        lr: inner learning rate ``η``.
        momentum: ``μ`` (PyTorch convention: ``v ← μ v + g``, ``w ← w − η v``).
        weight_decay: L2 coefficient ``λ`` added to the gradient.
        snapshot_device: where the ``T`` weight snapshots are kept (``"cpu"`` to spare accelerator memory);
            ``None`` keeps them on the weights' device.

    Returns:
        An :class:`UnrollTrace` for :func:`reverse_sgd`.
    """
    _check(steps, lr, momentum, weight_decay)
    meta_d = _detached(meta)
    w = {k: v.detach().clone() for k, v in params.items()}
    v = {k: torch.zeros_like(t) for k, t in w.items()}
    snapshots, losses = [], []
    for t in range(steps):
        snapshots.append({k: x.to(snapshot_device, copy=True) if snapshot_device else x.clone() for k, x in w.items()})
        with torch.enable_grad():
            leaves = {k: x.requires_grad_(True) for k, x in w.items()}
            x, y = batch_fn(t, meta_d)
            loss = loss_fn(leaves, x, y)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        losses.append(float(loss.detach()))
        with torch.no_grad():
            new_w = {}
            for (k, wk), g in zip(w.items(), grads, strict=True):
                wk = wk.detach()
                if weight_decay:
                    g = g + weight_decay * wk
                v[k] = momentum * v[k] + g
                new_w[k] = wk - lr * v[k]
            w = new_w
    return UnrollTrace(w, v, snapshots, losses, float(lr), float(momentum), float(weight_decay))


def reverse_sgd(
    loss_fn: InnerLoss,
    trace: UnrollTrace,
    batch_fn: BatchFn,
    meta: dict[str, Tensor],
    grad_params: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The exact hyper-gradient of ``L(w_T)`` with respect to ``meta`` (and ``w_0``), one step's graph at a time.

    Walking back from ``dw = ∂L/∂w_T`` with ``dv = 0``: at step ``t`` (``T−1`` down to 0) ``dv ← dv − η dw``; the
    vector-Jacobian product of ``g_t(w_t, θ)`` with ``dv`` adds its ``θ`` part to the hyper-gradient and its ``w`` part
    to ``dw`` (which keeps the identity path ``w_t → w_{t+1}``); then ``dv ← μ dv``. Step ``t``'s batch is rebuilt
    by ``batch_fn(t, meta)`` (the same indices and augmentation as in the forward pass), so gradients flow into
    whatever produced it.

    Args:
        loss_fn: the inner loss used in :func:`unroll_sgd`.
        trace: the forward pass's :class:`UnrollTrace`.
        batch_fn: the same batch builder as in the forward pass.
        meta: the meta-parameters (any tensors; they need not require grad).
        grad_params: ``∂L/∂w_T`` by parameter name.

    Returns:
        ``(grad_meta, grad_w0)``: gradients by name, ``grad_meta`` in ``meta``'s dtypes and devices (zeros where a
        meta-parameter does not affect the batches).
    """
    lr, mu, wd = trace.lr, trace.momentum_coef, trace.weight_decay
    names = list(trace.params)
    if set(grad_params) != set(names):
        raise ValueError(f"grad_params must hold one gradient per weight: got {sorted(grad_params)}, need {names}")
    device = {k: trace.params[k].device for k in names}
    dw = {k: grad_params[k].detach().to(trace.params[k]).clone() for k in names}
    dv = {k: torch.zeros_like(dw[k]) for k in names}
    meta_names = list(meta)
    dmeta = {k: torch.zeros_like(m, memory_format=torch.preserve_format).detach() for k, m in meta.items()}
    for t in range(trace.steps - 1, -1, -1):
        for k in names:
            dv[k] = dv[k] - lr * dw[k]
        with torch.enable_grad():
            w_t = {k: trace.snapshots[t][k].to(device[k]).requires_grad_(True) for k in names}
            m_t = {k: m.detach().requires_grad_(True) for k, m in meta.items()}
            x, y = batch_fn(t, m_t)
            loss = loss_fn(w_t, x, y)
            g = torch.autograd.grad(loss, [w_t[k] for k in names], create_graph=True)
            # The weight-decay term λ w_t of g_t contributes λ·dv to dw directly (added below, no graph needed).
            inputs = [w_t[k] for k in names] + [m_t[k] for k in meta_names]
            vjp = torch.autograd.grad(g, inputs, grad_outputs=[dv[k] for k in names], allow_unused=True)
        for i, k in enumerate(names):
            hw = vjp[i]
            if hw is not None:
                dw[k] = dw[k] + hw.detach()
            if wd:
                dw[k] = dw[k] + wd * dv[k]
        for j, k in enumerate(meta_names):
            hx = vjp[len(names) + j]
            if hx is not None:
                dmeta[k] += hx.detach()
        for k in names:
            dv[k] = mu * dv[k]
    return dmeta, dw


def unroll_sgd_naive(
    loss_fn: InnerLoss,
    params: dict[str, Tensor],
    batch_fn: BatchFn,
    meta: dict[str, Tensor],
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, Tensor]:
    """The reference: the same unroll with ``create_graph=True``, so ``w_T`` is differentiable in ``meta``.

    Keeps every step's activations and second-order graph alive until the outer backward: memory grows linearly in
    ``steps`` (use it for tests and for the memory benchmark, not for training).

    Returns:
        ``w_T`` by name, attached to the graph of ``meta`` (and of ``params`` if they require grad).
    """
    _check(steps, lr, momentum, weight_decay)
    w = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
    v: dict[str, Tensor] = {}
    for t in range(steps):
        x, y = batch_fn(t, meta)
        loss = loss_fn(w, x, y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        new_w = {}
        for (k, wk), g in zip(w.items(), grads, strict=True):
            if weight_decay:
                g = g + weight_decay * wk
            v[k] = momentum * v[k] + g if k in v else g
            new_w[k] = wk - lr * v[k]
        w = new_w
    return w


def unroll_hypergradient(
    loss_fn: InnerLoss,
    outer_fn: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    batch_fn: BatchFn,
    meta: dict[str, Tensor],
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    snapshot_device: torch.device | str | None = None,
) -> tuple[Tensor, dict[str, Tensor], UnrollTrace]:
    """Forward unroll, outer loss ``outer_fn(w_T)``, and the reverse pass, in one call.

    Args:
        outer_fn: the outer objective of the final weights (e.g. cross-entropy on a real batch); only its gradient
            in ``w_T`` is used (an outer loss that depends on ``meta`` directly must add that part itself).
        the rest: as in :func:`unroll_sgd`.

    Returns:
        ``(outer_loss, grad_meta, trace)``: the detached outer loss, the hyper-gradient by meta-parameter name, and
        the forward trace (inner losses, final weights).
    """
    trace = unroll_sgd(loss_fn, params, batch_fn, meta, steps, lr, momentum, weight_decay, snapshot_device)
    with torch.enable_grad():
        w_T = {k: x.detach().requires_grad_(True) for k, x in trace.params.items()}
        outer = outer_fn(w_T)
        grads = torch.autograd.grad(outer, list(w_T.values()))
    grad_meta, _ = reverse_sgd(loss_fn, trace, batch_fn, meta, dict(zip(w_T, grads, strict=True)))
    return outer.detach(), grad_meta, trace
