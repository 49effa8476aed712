"""The linearised forward of a network at base parameters θ0 (RCIG's reparameterised model).

A network ``f(x; θ) = φ(x; θ_body) W0ᵀ + b0`` is replaced by its first-order expansion in the tangent parameters δ
(every body parameter and the last layer's bias; the last layer's kernel tangent is masked out, because RCIG
eliminates a separate last layer ``W`` analytically):

    g(x) = u(x) + φ0(x)ᵀ W,    u(x) = J_θ f(x; θ0) · δ = (J_body φ(x; θ0) · δ_body) W0ᵀ + δ_b,

where ``φ0(x) = φ(x; θ0)`` are the frozen penultimate features (the primal of the JVP). ``g`` is linear in (δ, W):
learning on it is learning on the network's frozen finite-width NTK. The JVP is one ``torch.func.jvp`` through
``functional_call``; everything stays differentiable w.r.t. ``x`` and δ by ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

__all__ = ["JacobianLinearisedNet", "LinearisedNet", "head_names", "linearised_forward", "tangent_keys"]


def head_names(head: str = "classifier") -> tuple[str, str]:
    """Parameter names of the last layer's kernel and bias (``classifier.weight``, ``classifier.bias``)."""
    return f"{head}.weight", f"{head}.bias"


def tangent_keys(params: Mapping[str, Tensor], head: str = "classifier") -> list[str]:
    """The parameters that carry a tangent: all but the last layer's kernel, in the network's order.

    Raises:
        KeyError: If the network has no ``<head>.weight``/``<head>.bias``.
    """
    w, b = head_names(head)
    if w not in params or b not in params:
        raise KeyError(f"the network has no last layer {head!r} with weight and bias (parameters: {', '.join(params)})")
    return [k for k in params if k != w]


def _body_features(
    net: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, head: str
) -> Callable[[dict[str, Tensor]], Tensor]:
    w, b = head_names(head)
    fixed = {k: v for k, v in params.items() if k not in (w, b)}

    def features(body: dict[str, Tensor]) -> Tensor:
        return functional_call(net, {**fixed, **body, **buffers}, (x,), {"features_only": True})

    return features


def linearised_forward(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    delta: Mapping[str, Tensor],
    head: str = "classifier",
) -> tuple[Tensor, Tensor]:
    """Frozen features ``φ0(x)`` and the tangent output ``u(x) = J_θ f(x; θ0)·δ`` in one JVP.

    Args:
        net: The network (its forward must accept ``features_only=True``); its own tensors are not used.
        params: Base parameters θ0 by name (including ``<head>.weight`` and ``<head>.bias``).
        buffers: Buffers by name (passed through unchanged; use eval-mode networks without running statistics).
        x: Inputs ``(B, ...)``.
        delta: Tangents by name for :func:`tangent_keys` (the last layer's kernel has none: it is masked out).
        head: Name of the last linear layer.

    Returns:
        ``(φ0(x), u(x))`` of shapes ``(B, d)`` and ``(B, C)``; differentiable w.r.t. ``x`` and ``delta``.
    """
    w, b = head_names(head)
    keys = tangent_keys(params, head)
    if set(delta) != set(keys):
        missing, extra = sorted(set(keys) - set(delta)), sorted(set(delta) - set(keys))
        raise KeyError(f"delta must hold a tangent for every parameter but {w}: missing {missing}, unexpected {extra}")
    body = {k: params[k] for k in keys if k != b}
    feats, t_feats = jvp(_body_features(net, params, buffers, x, head), (body,), ({k: delta[k] for k in body},))
    u = t_feats @ params[w].T + delta[b]
    return feats, u


class _Linearised:
    """What both linearised-network forms share: the base parameters, the tangent layout and its size."""

    def _setup(self, params: Mapping[str, Tensor], head: str, chunk: int | None) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be positive or None, got {chunk}")
        self.w_name, self.b_name = head_names(head)
        self.keys = tangent_keys(params, head)
        self.params = {k: v.detach() for k, v in params.items()}
        self.body_keys = [k for k in self.keys if k != self.b_name]
        self.w0 = self.params[self.w_name]
        self.sizes = [self.params[k].numel() for k in self.keys]

    @property
    def num_tangents(self) -> int:
        """Length of a flat tangent vector."""
        return sum(self.sizes)


class LinearisedNet(_Linearised):
    """The linearised network on a fixed batch, for the matrix-free products the RCIG solves repeat.

    Holds the frozen features ``φ0(x)`` and a reverse-mode closure of the feature map at θ0 (one forward, kept), so
    that ``J v`` (one ``jvp``) and ``Jᵀ r`` (one backward through the kept graph) cost no fresh forward pass.
    ``J`` is the Jacobian of the network's logits w.r.t. the tangent parameters (:func:`tangent_keys`), flattened.
    Nothing here is differentiable w.r.t. ``x`` (the solves run on a detached support set).

    Args:
        net, params, buffers, head: as :func:`linearised_forward`.
        x: The batch (detached).
        chunk: Pass at most this many images at a time (bounds memory, never changes the result); ``None``: all.
    """

    def __init__(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        x: Tensor,
        head: str = "classifier",
        chunk: int | None = None,
    ) -> None:
        self._setup(params, head, chunk)
        x = x.detach()
        step = len(x) if chunk is None else chunk
        self._chunks = []
        feats = []
        body = {k: self.params[k] for k in self.body_keys}
        for i in range(0, len(x), max(step, 1)):
            fn = _body_features(net, self.params, buffers, x[i : i + step], head)
            with torch.enable_grad():
                f, pull = vjp(fn, body)
            self._chunks.append((fn, pull, i, min(i + step, len(x))))
            feats.append(f.detach())
        self.features = torch.cat(feats) if feats else x.new_zeros(0, self.w0.shape[1])

    def _split(self, v: Tensor) -> dict[str, Tensor]:
        return {k: p.view_as(self.params[k]) for k, p in zip(self.keys, torch.split(v, self.sizes), strict=True)}

    def jvp(self, v: Tensor) -> Tensor:
        """``J v``: the tangent logits ``(B, C)`` of the flat tangent ``v``."""
        tangents = self._split(v)
        body_t = {k: tangents[k] for k in self.body_keys}
        body = {k: self.params[k] for k in self.body_keys}
        outs = [jvp(fn, (body,), (body_t,))[1] for fn, _, _, _ in self._chunks]
        return torch.cat(outs) @ self.w0.T + tangents[self.b_name]

    def vjp(self, r: Tensor) -> Tensor:
        """``Jᵀ r`` for logit cotangents ``r (B, C)``, as a flat tangent vector."""
        cot = r @ self.w0  # the logits' cotangent pulled back through the last layer onto the features
        grads: dict[str, Tensor] = {}
        for _, pull, lo, hi in self._chunks:
            (g,) = pull(cot[lo:hi])
            for k in self.body_keys:
                grads[k] = grads[k] + g[k] if k in grads else g[k]
        grads[self.b_name] = r.sum(0)
        return torch.cat([grads[k].reshape(-1) for k in self.keys])


class JacobianLinearisedNet(_Linearised):
    """:class:`LinearisedNet` with the Jacobian formed once: every later ``J v`` and ``Jᵀ r`` is one matmul.

    ``J`` (``B·C × P`` floats for ``B`` images, ``C`` outputs, ``P`` tangent parameters) is built by per-sample
    reverse mode (``vmap(jacrev(...))``), about ``C`` backward passes' work, after which a product costs ``2·B·C·P``
    FLOPs instead of a JVP and a backward pass through the network. RCIG's two solves take 40 such products per
    outer step, so on the CPU recipes' networks (``P`` ≈ 0.1 M) this halved the step at IPC 10; it is used where
    ``J`` fits a memory cap (``B·C·P·4`` bytes), see :func:`~lightning_distill.functional.rcig.inner_system`.

    Args:
        net, params, buffers, x, head: as :class:`LinearisedNet`.
        chunk: Build the per-sample Jacobian for at most this many images at a time (memory only).
    """

    def __init__(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        x: Tensor,
        head: str = "classifier",
        chunk: int | None = None,
    ) -> None:
        from torch.func import jacrev, vmap

        self._setup(params, head, chunk)
        fixed = {k: v for k, v in self.params.items() if k not in self.body_keys}
        x = x.detach()

        def logits_one(body: dict[str, Tensor], xi: Tensor) -> Tensor:
            feats = functional_call(net, {**fixed, **body, **buffers}, (xi[None],), {"features_only": True})
            return feats[0] @ self.w0.T

        body = {k: self.params[k] for k in self.body_keys}
        step = len(x) if chunk is None else chunk
        rows, feats = [], []
        with torch.no_grad():
            for i in range(0, len(x), max(step, 1)):
                xb = x[i : i + step]
                jac = vmap(jacrev(logits_one), in_dims=(None, 0))(body, xb)  # {name: (b, C, *shape)}
                rows.append(torch.cat([jac[k].flatten(2) for k in self.body_keys], 2))
                feats.append(functional_call(net, {**self.params, **buffers}, (xb,), {"features_only": True}))
        c = self.w0.shape[0]
        self.jacobian = torch.cat(rows).reshape(-1, rows[0].shape[2]) if rows else x.new_zeros(0, 0)  # (B·C, P_body)
        self.features = torch.cat(feats) if feats else x.new_zeros(0, self.w0.shape[1])
        self.num_classes = c

    def _bias_slice(self, v: Tensor) -> Tensor:
        # The flat order is the network's (tangent_keys); the last layer's bias is the final entry of that order.
        start = sum(self.params[k].numel() for k in self.keys[: self.keys.index(self.b_name)])
        return v[start : start + self.num_classes]

    def _body(self, v: Tensor) -> Tensor:
        parts = torch.split(v, self.sizes)
        return torch.cat([p for k, p in zip(self.keys, parts, strict=True) if k != self.b_name])

    def jvp(self, v: Tensor) -> Tensor:
        """``J v``: the tangent logits ``(B, C)`` of the flat tangent ``v``."""
        return (self.jacobian @ self._body(v)).reshape(-1, self.num_classes) + self._bias_slice(v)

    def vjp(self, r: Tensor) -> Tensor:
        """``Jᵀ r`` for logit cotangents ``r (B, C)``, as a flat tangent vector."""
        body = self.jacobian.T @ r.reshape(-1)
        out, start = [], 0
        for k in self.keys:
            if k == self.b_name:
                out.append(r.sum(0))
            else:
                n = self.params[k].numel()
                out.append(body[start : start + n])
                start += n
        return torch.cat(out)
