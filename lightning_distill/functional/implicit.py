"""Second-order products for implicit differentiation: Hessian-vector products and the implicit VJP.

For an inner problem ``δ*(S) = argmin_δ L_in(δ; S)`` the implicit function theorem gives the meta-gradient of an
outer loss ``L_out(δ*(S), S)`` as ``∂L_out/∂S − ∂²L_in/∂S∂δ · H⁻¹ ∂L_out/∂δ`` with ``H = ∇²_δ L_in``. This module
provides the two products that formula needs, on plain tensors and parameter dicts, by torch.func and autograd:

* :func:`hvp`: ``H v`` by forward-over-reverse (``jvp`` of ``grad``), never forming ``H``;
* :func:`implicit_vjp`: ``−∇_S [vᵀ ∇_δ L_in(δ, S)]``, the mixed second derivative contracted with ``v = H⁻¹ g``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp

__all__ = ["hvp", "implicit_vjp"]


def hvp(f: Callable[[Any], Tensor], primals: Any, tangents: Any) -> Any:
    """Hessian-vector product ``∇²f(primals) · tangents`` by forward-over-reverse (``jvp(grad(f))``).

    Args:
        f: A scalar function of one argument (a tensor or a dict of tensors).
        primals: The point.
        tangents: The vector, with the structure of ``primals``.

    Returns:
        ``H v`` with the structure of ``primals``.
    """
    return jvp(grad(f), (primals,), (tangents,))[1]


def implicit_vjp(
    inner_loss: Callable[..., Tensor],
    delta: dict[str, Tensor],
    v: dict[str, Tensor],
    outer: Sequence[Tensor],
) -> tuple[Tensor | None, ...]:
    """The implicit term of the meta-gradient, ``−∇_S [vᵀ ∇_δ L_in(δ, S)]`` for each tensor ``S`` in ``outer``.

    ``∇_δ L_in`` is taken by autograd with ``create_graph`` so that the dot product with ``v`` can be differentiated
    again, w.r.t. the outer variables (a mixed second derivative; ``delta`` and ``v`` are treated as constants).

    Args:
        inner_loss: ``inner_loss(delta, *outer) -> scalar``, differentiable in both.
        delta: The inner solution ``δ*`` (tensors; detached copies requiring grad are made here).
        v: The inverse-HVP solution ``H⁻¹ ∂L_out/∂δ``, same keys as ``delta``.
        outer: The outer variables (tensors that require grad, e.g. the synthetic images and labels).

    Returns:
        One gradient per outer tensor (``None`` where the inner loss does not depend on it).
    """
    if set(v) != set(delta):
        raise ValueError("v and delta must have the same keys")
    d = {k: t.detach().requires_grad_(True) for k, t in delta.items()}
    with torch.enable_grad():
        loss = inner_loss(d, *outer)
        g = torch.autograd.grad(loss, list(d.values()), create_graph=True)
        dot = sum((gi * v[k].detach()).sum() for gi, k in zip(g, d, strict=True))
        wanted = [o for o in outer if o.requires_grad]
        grads = torch.autograd.grad(dot, wanted, allow_unused=True) if wanted else ()
    it = iter(grads)
    return tuple(None if not o.requires_grad else _neg(next(it)) for o in outer)


def _neg(g: Tensor | None) -> Tensor | None:
    return None if g is None else -g
