"""Preprocessing: both ZCA conventions against closed forms computed independently (numpy, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_distill.data import Preprocessing, fit_zca_kornia, fit_zca_trace

SHAPE = (3, 4, 4)  # d = 48: large enough for structure, small enough for exact float64 checks
D = 48


def _images(n: int, seed: int = 0) -> torch.Tensor:
    # Correlated pixels (a random mixing of independent noise) so whitening has something to undo.
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ mix + 0.5
    return x.reshape(n, *SHAPE)


def _numpy_trace_zca(x: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The KIP/FRePo/RCIG formula, written from the description with numpy's SVD."""
    flat = x.reshape(len(x), -1)
    mean = flat.mean(0)
    centred = flat - mean
    cov = centred.T @ centred / len(flat)
    d = cov.shape[0]
    u, s, _ = np.linalg.svd(cov + reg * np.trace(cov) / d * np.eye(d))  # s descending
    if len(flat) < d:
        s[len(flat) :] = 1.0
    return u @ np.diag(s**-0.5) @ u.T, u @ np.diag(s**0.5) @ u.T, mean


def test_trace_zca_matches_independent_formula() -> None:
    x = _images(500)
    fit = fit_zca_trace(x, reg=0.1)
    w, w_inv, mean = _numpy_trace_zca(x.numpy(), 0.1)
    assert fit.matrix.dtype == torch.float64
    np.testing.assert_allclose(fit.matrix.numpy(), w, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.inverse.numpy(), w_inv, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.mean.numpy(), mean, rtol=1e-12, atol=1e-12)


def test_trace_zca_rank_control() -> None:
    # n < d: the centred data has rank n - 1, so eigenvalues from index n - 1 on are all equal (= r) and their
    # eigenvectors are arbitrary; rank control (index n on set to 1) splits that space, so W itself is not unique.
    # What is unique: W's spectrum, and W on the data span. Check those against the numpy formula.
    n = 20
    x = _images(n)
    fit = fit_zca_trace(x, reg=0.1)
    w, _, mean = _numpy_trace_zca(x.numpy(), 0.1)
    np.testing.assert_allclose(np.linalg.eigvalsh(fit.matrix.numpy()), np.linalg.eigvalsh(w), rtol=1e-9)
    assert np.sum(np.isclose(np.linalg.eigvalsh(fit.matrix.numpy()), 1.0)) == D - n
    centred = x.reshape(n, -1).numpy() - mean
    np.testing.assert_allclose(centred @ fit.matrix.numpy(), centred @ w, atol=1e-9)
    np.testing.assert_allclose((fit.matrix @ fit.inverse).numpy(), np.eye(D), atol=1e-9)
    np.testing.assert_allclose(fit.matrix.numpy(), fit.matrix.numpy().T, atol=1e-12)


def test_trace_zca_whitened_covariance() -> None:
    x = _images(500)
    flat = x.reshape(500, -1)
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / 500
    lam = torch.linalg.eigvalsh(cov)
    reg = 0.1
    r = reg * lam.sum() / D
    fit = fit_zca_trace(x, reg=reg)
    white = (flat - fit.mean) @ fit.matrix
    white_cov = white.T @ white / 500
    # With the ridge, every whitened eigenvalue is λ / (λ + r); without it, the covariance is the identity.
    expected = torch.sort(lam / (lam + r)).values
    torch.testing.assert_close(torch.linalg.eigvalsh(white_cov), expected, rtol=1e-8, atol=1e-10)
    fit0 = fit_zca_trace(x, reg=0.0)
    white0 = (flat - fit0.mean) @ fit0.matrix
    torch.testing.assert_close(white0.T @ white0 / 500, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-8)


def test_trace_zca_chunking_does_not_change_the_result() -> None:
    x = _images(100).float()
    a, b = fit_zca_trace(x, chunk_size=7), fit_zca_trace(x, chunk_size=4096)
    torch.testing.assert_close(a.matrix, b.matrix, rtol=1e-10, atol=1e-10)


def test_kornia_zca_matches_closed_form_and_kornia_module() -> None:
    import kornia

    x = _images(300)
    eps = 0.1
    fit = fit_zca_kornia(x, eps=eps)
    flat = x.reshape(300, -1).numpy()
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (len(flat) - 1)  # kornia: unbiased covariance, absolute eps
    u, s, _ = np.linalg.svd(cov)
    np.testing.assert_allclose(fit.matrix.numpy(), u @ np.diag((s + eps) ** -0.5) @ u.T, atol=1e-9)
    np.testing.assert_allclose(fit.inverse.numpy(), u @ np.diag((s + eps) ** 0.5) @ u.T, atol=1e-9)
    # Applied through Preprocessing without normalisation (MTT), it equals kornia's own module.
    module = kornia.enhance.ZCAWhitening(eps=eps, compute_inv=True).fit(x)
    prep64 = Preprocessing.identity(SHAPE).with_zca("kornia", fit, dtype=torch.float64)
    torch.testing.assert_close(prep64.apply(x), module(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prep64.invert(module(x)), module.inverse_transform(module(x)), rtol=1e-5, atol=1e-5)


def test_kornia_zca_whitens_with_tiny_eps() -> None:
    x = _images(500)
    fit = fit_zca_kornia(x, eps=1e-12)
    flat = x.reshape(500, -1)
    white = (flat - fit.mean) @ fit.matrix
    torch.testing.assert_close(white.T @ white / 499, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-6)


def _preps(x: torch.Tensor) -> dict[str, Preprocessing]:
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    base = Preprocessing(mean=mean, std=std, image_shape=SHAPE)
    return {
        "none": base,
        "trace": base.with_zca("trace", fit_zca_trace(base.apply(x)), dtype=torch.float64),
        "kornia": Preprocessing.identity(SHAPE).with_zca("kornia", fit_zca_kornia(x), dtype=torch.float64),
    }


@pytest.mark.parametrize("zca", ["none", "trace", "kornia"])
def test_apply_formula_and_invert_round_trip(zca: str) -> None:
    x = _images(64).clamp(0, 1)
    prep = _preps(x)[zca]
    out = prep.apply(x)
    mean = torch.tensor(prep.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float64).view(-1, 1, 1)
    expected = (x - mean) / std
    if zca != "none":
        expected = ((expected.reshape(64, -1) - prep.zca_mean) @ prep.zca_matrix).reshape(x.shape)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prep.invert(out), x, rtol=1e-9, atol=1e-9)
    # A single image (no batch axis) works too.
    torch.testing.assert_close(prep.apply(x[0]), out[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("zca", ["none", "trace"])
def test_to_dict_round_trip_weights_only(zca: str, tmp_path) -> None:
    x = _images(64).clamp(0, 1)
    prep = _preps(x)[zca]
    path = tmp_path / "prep.pt"
    torch.save(prep.to_dict(), path)
    loaded = Preprocessing.from_dict(torch.load(path, weights_only=True))
    assert loaded.zca == zca and loaded.image_shape == SHAPE and loaded.mean == prep.mean
    torch.testing.assert_close(loaded.apply(x), prep.apply(x), rtol=0, atol=0)


def test_fit_builds_the_same_as_the_pieces() -> None:
    x = _images(200).clamp(0, 1).float()
    prep = Preprocessing.fit(x, mean=[0.5] * 3, std=[0.25] * 3, zca="trace", zca_reg=0.1)
    direct = fit_zca_trace((x - 0.5) / 0.25, reg=0.1)
    assert prep.zca_matrix.dtype == torch.float32
    torch.testing.assert_close(prep.zca_matrix, direct.matrix.float())
    assert Preprocessing.fit(x).zca == "none"


def test_invalid_preprocessing_is_rejected() -> None:
    with pytest.raises(ValueError, match="zca must be one of"):
        Preprocessing(mean=[0.0], std=[1.0], zca="pca", image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(mean=[0.0], std=[1.0], image_shape=(3, 2, 2))
    with pytest.raises(ValueError, match="needs zca_matrix"):
        Preprocessing(mean=[0.0], std=[1.0], zca="trace", image_shape=(1, 2, 2))
    prep = Preprocessing.identity((1, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        prep.apply(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        prep.apply(torch.zeros(1, 1, 3, 3))
