"""Linear kernels and kernel ridge regression (the inner solve of FRePo).

Everything here is plain differentiable tensor maths: the meta-gradient w.r.t. the synthetic features and labels
comes from ordinary autograd through the Gram matrices and the Cholesky solve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload

import torch
from torch import Tensor

__all__ = ["gram", "krr_predict", "no_tf32", "ridge_solve"]

# Jitter (relative to the mean diagonal of K_ss) tried in float64 when even the float64 Cholesky fails, i.e. when
# K_ss + λI is singular to working precision (for instance ridge 0 with duplicated support points).
_JITTERS_64 = (0.0, 1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6)


def _precision_backends() -> list[Any]:
    """Backends that expose the torch>=2.9 ``fp32_precision`` API (cuBLAS matmul, cuDNN conv, oneDNN matmul)."""
    candidates = [
        getattr(torch.backends.cuda, "matmul", None),
        getattr(getattr(torch.backends, "cudnn", None), "conv", None),
        getattr(getattr(torch.backends, "mkldnn", None), "matmul", None),
    ]
    return [b for b in candidates if b is not None and hasattr(b, "fp32_precision")]


@contextmanager
def no_tf32() -> Iterator[None]:
    """Run float32 matmuls and convolutions in full IEEE float32 (no TF32 or bf16 internals), then restore the flags.

    TF32 tensor cores keep 10 mantissa bits, which corrupts the ill-conditioned kernel solves of KRR-based methods.

    On torch >= 2.9 this saves and restores the per-backend ``fp32_precision`` strings. That API is used rather
    than ``allow_tf32`` because writing the legacy flags after ``torch.set_float32_matmul_precision("medium")``
    (or after any use of the new API) leaves torch in a "mixed API" state in which
    ``torch.get_float32_matmul_precision()`` raises for the rest of the process; the new API restores every
    observable flag exactly. Older torch falls back to ``allow_tf32``.
    """
    backends = _precision_backends()
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, value in zip(backends, saved, strict=True):
                b.fp32_precision = value
    else:  # pragma: no cover - torch < 2.9
        saved_matmul = torch.backends.cuda.matmul.allow_tf32
        saved_cudnn = torch.backends.cudnn.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved_matmul
            torch.backends.cudnn.allow_tf32 = saved_cudnn


def gram(a: Tensor, b: Tensor) -> Tensor:
    """Linear kernel between two batches: ``a_flat @ b_flat.T``.

    Runs in whatever matmul precision is active, autocast included; wrap in :func:`no_tf32` and a disabled
    ``torch.autocast`` region (as :func:`krr_predict` does) when the result feeds a linear solve.

    Args:
        a: Features ``(N, ...)``, flattened from dim 1.
        b: Features ``(M, ...)``, flattened from dim 1, same flattened width as ``a``.

    Returns:
        The ``(N, M)`` Gram matrix.
    """
    return a.flatten(1) @ b.flatten(1).T


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    # Half-precision features (autocast, bf16 nets) are solved in float32 at least.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _krr_attempt(
    feat_s: Tensor,
    y_s: Tensor,
    feat_t: Tensor,
    ridge: float,
    relative: bool,
    dtype: torch.dtype,
    jitter: float,
) -> tuple[Tensor, Tensor]:
    """One Cholesky solve in ``dtype``; returns the prediction and the ``cholesky_ex`` info tensor."""
    fs = feat_s.flatten(1).to(dtype)
    ft = feat_t.flatten(1).to(dtype)
    ys = y_s.to(dtype)
    k_ss = gram(fs, fs)
    k_ts = gram(ft, fs)
    m = k_ss.shape[0]
    # tr(K_ss)/M is the mean squared feature norm; FRePo scales its ridge by it so it is invariant to feature scale.
    # It stays in the graph (FRePo differentiates through it as well).
    mean_diag = torch.diagonal(k_ss).sum() / m
    lam = ridge * mean_diag if relative else torch.as_tensor(ridge, dtype=dtype, device=k_ss.device)
    if jitter > 0.0:
        # The jitter is relative to the kernel scale, but detached: it is a numerical device, not part of the model.
        scale = mean_diag.detach()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        lam = lam + jitter * scale
    alpha, info = _ridge_attempt(k_ss, ys, lam)
    return k_ts @ alpha, info


def _ridge_attempt(k: Tensor, rhs: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(K + λI)⁻¹ rhs`` by one Cholesky factorisation; returns the solution and the ``cholesky_ex`` info."""
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    chol, info = torch.linalg.cholesky_ex(k + lam * eye)
    return torch.cholesky_solve(rhs, chol), info


@overload
def krr_predict(
    feat_s: Tensor,
    y_s: Tensor,
    feat_t: Tensor,
    ridge: float = ...,
    relative: bool = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def krr_predict(
    feat_s: Tensor,
    y_s: Tensor,
    feat_t: Tensor,
    ridge: float = ...,
    relative: bool = ...,
    *,
    return_info: Literal[True],
) -> tuple[Tensor, dict[str, Any]]: ...


def krr_predict(
    feat_s: Tensor,
    y_s: Tensor,
    feat_t: Tensor,
    ridge: float = 1e-6,
    relative: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Kernel ridge regression with a linear kernel on features: ``Ŷ_t = K_ts (K_ss + λI)⁻¹ Y_s``.

    ``K_ss = F_s F_sᵀ`` and ``K_ts = F_t F_sᵀ`` (no bias, no normalisation). With ``relative=True`` the ridge is
    ``λ = ridge · tr(K_ss) / M`` as in FRePo, otherwise ``λ = ridge``.

    The Gram matrices and the solve run in float32 (float64 if any input is float64) with TF32 and autocast
    disabled, whatever precision policy produced the features (bf16 features are cast up first; see
    :mod:`lightning_distill.precision`). If the Cholesky factorisation reports failure or the prediction is not
    finite, the whole solve is redone in float64 from the features and cast back; if even that is singular (e.g.
    ``ridge=0`` with duplicated support points) a small jitter relative to ``tr(K_ss)/M`` is added, growing from
    1e-12 up to 1e-6.
    The result is differentiable w.r.t. ``feat_s``, ``y_s`` and ``feat_t`` by ordinary autograd (also through the
    relative ridge).

    The success check costs one host-device synchronisation per call.

    Args:
        feat_s: Support (synthetic) features ``(M, ...)``, flattened from dim 1.
        y_s: Support targets ``(M, K)``.
        feat_t: Query (real) features ``(N, ...)``, flattened from dim 1.
        ridge: Ridge coefficient (relative or absolute, see ``relative``).
        relative: Scale ``ridge`` by ``tr(K_ss)/M``.
        return_info: Also return a dict with ``"fallback"`` (bool: the float64 redo happened) and ``"jitter"``
            (float: the relative jitter that was needed, 0.0 if none), so a method can log how often it happens.

    Returns:
        ``Ŷ_t`` of shape ``(N, K)`` in the compute dtype (float32, or float64 for float64 inputs), or
        ``(Ŷ_t, info)`` when ``return_info`` is set.

    Raises:
        ValueError: On mismatched shapes.
        torch.linalg.LinAlgError: If the features are not finite or no jitter makes the solve succeed.
    """
    if feat_s.shape[0] != y_s.shape[0]:
        raise ValueError(f"feat_s has {feat_s.shape[0]} rows but y_s has {y_s.shape[0]}")
    if y_s.dim() != 2:
        raise ValueError(f"y_s must be (M, K), got shape {tuple(y_s.shape)}")
    if feat_s.flatten(1).shape[1] != feat_t.flatten(1).shape[1]:
        raise ValueError(f"feature widths differ: {feat_s.flatten(1).shape[1]} vs {feat_t.flatten(1).shape[1]}")

    dtype = _compute_dtype(feat_s, y_s, feat_t)
    info: dict[str, Any] = {"fallback": False, "jitter": 0.0}
    # Autocast would silently run the Gram matmuls in bf16/fp16 inside a mixed-precision training step.
    with torch.autocast(device_type=feat_s.device.type, enabled=False), no_tf32():
        pred, chol_info = _krr_attempt(feat_s, y_s, feat_t, ridge, relative, dtype, 0.0)
        # One sync for both checks. Cholesky can "succeed" on a badly conditioned float32 matrix and still give
        # inf/nan downstream, hence the finiteness check on the prediction too.
        ok = bool(((chol_info == 0) & torch.isfinite(pred).all()).item())
        if ok:
            return (pred, info) if return_info else pred

        if not (torch.isfinite(feat_s).all() and torch.isfinite(feat_t).all() and torch.isfinite(y_s).all()):
            raise torch.linalg.LinAlgError("krr_predict: non-finite features or targets (diverged network?)")
        info["fallback"] = dtype != torch.float64
        for jitter in _JITTERS_64:
            pred64, chol_info = _krr_attempt(feat_s, y_s, feat_t, ridge, relative, torch.float64, jitter)
            if bool(((chol_info == 0) & torch.isfinite(pred64).all()).item()):
                info["jitter"] = jitter
                pred = pred64.to(dtype)
                return (pred, info) if return_info else pred
    raise torch.linalg.LinAlgError(
        f"krr_predict: K_ss + λI is not positive definite even in float64 with relative jitter {_JITTERS_64[-1]}"
    )


def ridge_solve(
    k: Tensor, rhs: Tensor, ridge: float | Tensor, return_info: bool = False
) -> Tensor | tuple[Tensor, dict]:
    """``(K + λI)⁻¹ rhs`` for a symmetric PSD ``K`` with the absolute ridge ``λ = ridge``: :func:`krr_predict`'s solver.

    The same numerics as :func:`krr_predict`: float32 (float64 for float64 inputs) with TF32 and autocast off, one
    Cholesky factorisation, and on failure or a non-finite result the solve redone in float64 with a growing jitter
    relative to ``tr(K)/M``. Differentiable w.r.t. ``k``, ``rhs`` (and a tensor ``ridge``) by autograd. RCIG eliminates
    its last layer with this (``α = (K + λI)⁻¹(Ỹ − U)``).

    Args:
        k: Kernel matrix ``(M, M)``.
        rhs: Right-hand side ``(M, K)``.
        ridge: Absolute ridge ``λ > 0``.
        return_info: Also return ``{"fallback": bool, "jitter": float}``.

    Returns:
        The solution ``(M, K)`` in the compute dtype (and the info dict when asked).

    Raises:
        torch.linalg.LinAlgError: If the inputs are not finite or no jitter makes the solve succeed.
    """
    if k.dim() != 2 or k.shape[0] != k.shape[1] or rhs.shape[0] != k.shape[0]:
        raise ValueError(f"ridge_solve needs K (M, M) and rhs (M, ...), got {tuple(k.shape)} and {tuple(rhs.shape)}")
    dtype = _compute_dtype(k, rhs)
    info: dict[str, Any] = {"fallback": False, "jitter": 0.0}
    with torch.autocast(device_type=k.device.type, enabled=False), no_tf32():
        lam = torch.as_tensor(ridge, dtype=dtype, device=k.device)
        alpha, chol_info = _ridge_attempt(k.to(dtype), rhs.to(dtype), lam)
        if bool(((chol_info == 0) & torch.isfinite(alpha).all()).item()):
            return (alpha, info) if return_info else alpha
        if not (torch.isfinite(k).all() and torch.isfinite(rhs).all()):
            raise torch.linalg.LinAlgError("ridge_solve: non-finite kernel or right-hand side (diverged network?)")
        info["fallback"] = dtype != torch.float64
        k64 = k.to(torch.float64)
        scale = (torch.diagonal(k64).sum() / k64.shape[0]).detach()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        for jitter in _JITTERS_64:
            alpha64, chol_info = _ridge_attempt(k64, rhs.to(torch.float64), lam.to(torch.float64) + jitter * scale)
            if bool(((chol_info == 0) & torch.isfinite(alpha64).all()).item()):
                info["jitter"] = jitter
                alpha = alpha64.to(dtype)
                return (alpha, info) if return_info else alpha
    raise torch.linalg.LinAlgError(
        f"ridge_solve: K + λI is not positive definite even in float64 with relative jitter {_JITTERS_64[-1]}"
    )
