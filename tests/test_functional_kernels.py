"""krr_predict against dense closed forms, its float64 fallback, its meta-gradient and its precision hygiene."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.functional import gram, krr_predict, no_tf32
from lightning_distill.functional import kernels as kernels_mod


def _closed_form(feat_s: torch.Tensor, y_s: torch.Tensor, feat_t: torch.Tensor, ridge: float, relative: bool):
    """Ŷ = K_ts (K_ss + λI)⁻¹ Y by a dense LU solve in float64."""
    fs, ft, ys = feat_s.double().flatten(1), feat_t.double().flatten(1), y_s.double()
    k_ss, k_ts = fs @ fs.T, ft @ fs.T
    m = k_ss.shape[0]
    lam = ridge * torch.trace(k_ss) / m if relative else ridge
    return k_ts @ torch.linalg.solve(k_ss + lam * torch.eye(m, dtype=torch.float64), ys)


def _problem(m: int, d: int, n: int = 7, k: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    feat_s = torch.randn(m, d, generator=g, dtype=dtype)
    y_s = torch.randn(m, k, generator=g, dtype=dtype)
    feat_t = torch.randn(n, d, generator=g, dtype=dtype)
    return feat_s, y_s, feat_t


def _precision_flags() -> dict[str, object]:
    flags: dict[str, object] = {}
    for name, backend in [
        ("cuda.matmul", torch.backends.cuda.matmul),
        ("cudnn.conv", torch.backends.cudnn.conv),
        ("mkldnn.matmul", torch.backends.mkldnn.matmul),
    ]:
        flags[name] = getattr(backend, "fp32_precision", None)
    for name, read in [
        ("legacy.matmul", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("legacy.cudnn", lambda: torch.backends.cudnn.allow_tf32),
        ("matmul_precision", torch.get_float32_matmul_precision),
    ]:
        try:
            flags[name] = read()
        except RuntimeError as err:  # torch's "mixed legacy and new API" state
            flags[name] = f"error: {str(err)[:40]}"
    return flags


@pytest.fixture
def restore_precision_flags():
    backends = kernels_mod._precision_backends()
    saved = [b.fp32_precision for b in backends]
    yield
    for b, value in zip(backends, saved, strict=True):
        b.fp32_precision = value


def test_gram_is_flattened_inner_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gram(a, b), a.reshape(3, 4) @ b.T)


@pytest.mark.parametrize("m,d", [(5, 12), (12, 5)], ids=["M<d", "M>d"])
@pytest.mark.parametrize("relative,ridge", [(True, 1e-6), (True, 1e-2), (False, 0.3)])
def test_krr_matches_closed_form_float64(m, d, relative, ridge):
    feat_s, y_s, feat_t = _problem(m, d)
    pred, info = krr_predict(feat_s, y_s, feat_t, ridge=ridge, relative=relative, return_info=True)
    expected = _closed_form(feat_s, y_s, feat_t, ridge, relative)
    assert pred.dtype == torch.float64 and pred.shape == (7, 3)
    assert not info["fallback"] and info["jitter"] == 0.0
    torch.testing.assert_close(pred, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())


def test_krr_training_points_interpolate_with_tiny_ridge():
    # Predicting the support set itself with M < d and a tiny ridge reproduces the labels.
    feat_s, y_s, _ = _problem(6, 20)
    torch.testing.assert_close(krr_predict(feat_s, y_s, feat_s, ridge=1e-10), y_s, rtol=1e-6, atol=1e-6)


def test_krr_float32_close_to_float64_closed_form():
    feat_s, y_s, feat_t = _problem(8, 32, dtype=torch.float32)
    pred, info = krr_predict(feat_s, y_s, feat_t, return_info=True)
    assert pred.dtype == torch.float32 and not info["fallback"]
    torch.testing.assert_close(pred.double(), _closed_form(feat_s, y_s, feat_t, 1e-6, True), rtol=1e-3, atol=1e-4)


def test_krr_float64_redo_when_float32_cholesky_fails():
    # K = [[1, 1], [1, 1 + 1e-8]]: 1 + 1e-8 rounds to 1 in float32 (exactly singular), but is PD in float64.
    feat_s = torch.tensor([[1.0, 0.0], [1.0, 1e-4]])
    y_s = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    feat_t = torch.tensor([[2.0, 1e-4], [0.0, 3.0]])
    fs32 = feat_s.flatten(1)
    assert torch.linalg.cholesky_ex(fs32 @ fs32.T)[1].item() != 0  # the premise of the test
    pred, info = krr_predict(feat_s, y_s, feat_t, ridge=0.0, relative=False, return_info=True)
    assert info["fallback"] and info["jitter"] == 0.0
    assert pred.dtype == torch.float32 and torch.isfinite(pred).all()
    torch.testing.assert_close(pred.double(), _closed_form(feat_s, y_s, feat_t, 0.0, False), rtol=1e-5, atol=1e-5)


def test_krr_exactly_singular_uses_jitter_and_stays_differentiable():
    # Duplicated support point and ridge 0: K_ss is exactly singular in any precision (integer features with a
    # square squared norm, so products and the first pivot sqrt(9) = 3 are exact and the second pivot is exactly 0;
    # with e.g. norm² = 14 float32 rounding leaves a small positive pivot and Cholesky "succeeds").
    # The float64 redo then needs a jitter; labels of the duplicates agree, so the prediction on the support set
    # still interpolates them.
    feat_s = torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0], [0.0, 1.0, 0.0]], requires_grad=True)
    y_s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    pred, info = krr_predict(feat_s, y_s, feat_s, ridge=0.0, relative=False, return_info=True)
    assert info["fallback"] and info["jitter"] > 0.0
    assert torch.isfinite(pred).all()
    torch.testing.assert_close(pred, y_s.detach(), rtol=1e-4, atol=1e-4)
    pred.pow(2).sum().backward()
    assert torch.isfinite(feat_s.grad).all() and torch.isfinite(y_s.grad).all()


def test_krr_non_finite_features_raise():
    feat_s, y_s, feat_t = _problem(4, 6, dtype=torch.float32)
    feat_s[0, 0] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        krr_predict(feat_s, y_s, feat_t)


@pytest.mark.parametrize("relative,ridge", [(True, 1e-6), (False, 0.1)])
def test_krr_meta_gradient_gradcheck(relative, ridge):
    feat_s, y_s, feat_t = _problem(4, 6, n=3, k=2, seed=1)
    y_t = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def outer(fs, ys, ft):
        return 0.5 * (krr_predict(fs, ys, ft, ridge=ridge, relative=relative) - y_t).pow(2).sum()

    inputs = tuple(t.clone().requires_grad_(True) for t in (feat_s, y_s, feat_t))
    assert torch.autograd.gradcheck(outer, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_krr_meta_gradient_matches_closed_form_autograd():
    feat_s, y_s, feat_t = _problem(6, 10, n=5, k=3, seed=3)
    y_t = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (lambda a, b, c: krr_predict(a, b, c), lambda a, b, c: _closed_form(a, b, c, 1e-6, True)):
        fs, ys = feat_s.clone().requires_grad_(True), y_s.clone().requires_grad_(True)
        loss = 0.5 * (fn(fs, ys, feat_t) - y_t).pow(2).sum(1).mean()
        grads.append(torch.autograd.grad(loss, (fs, ys)))
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


def test_krr_ignores_autocast():
    feat_s, y_s, feat_t = _problem(6, 16, dtype=torch.float32)
    ref = krr_predict(feat_s, y_s, feat_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = krr_predict(feat_s, y_s, feat_t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_krr_shape_errors():
    feat_s, y_s, feat_t = _problem(4, 6)
    with pytest.raises(ValueError):
        krr_predict(feat_s, y_s[:3], feat_t)
    with pytest.raises(ValueError):
        krr_predict(feat_s, y_s, feat_t[:, :5])


@pytest.mark.parametrize("initial", ["default", "legacy_tf32_on", "medium", "new_api_tf32"])
def test_precision_flags_off_inside_and_restored_after(initial, monkeypatch, restore_precision_flags):
    if initial == "legacy_tf32_on":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif initial == "medium":
        torch.set_float32_matmul_precision("medium")
    elif initial == "new_api_tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    before = _precision_flags()

    seen = []
    real_cholesky_ex = torch.linalg.cholesky_ex

    def spy(*args, **kwargs):
        seen.append([b.fp32_precision for b in kernels_mod._precision_backends()])
        return real_cholesky_ex(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    krr_predict(*_problem(4, 6, dtype=torch.float32))
    assert seen and all(v == "ieee" for v in seen[0])
    assert _precision_flags() == before

    with pytest.raises(RuntimeError, match="boom"), no_tf32():
        raise RuntimeError("boom")
    assert _precision_flags() == before
