"""Preprocessing of real images into model-input space: per-channel mean/std, then optional ZCA whitening.

Two ZCA conventions exist in the dataset-distillation literature and they are not numerically interchangeable:

- ``"trace"`` (KIP / FRePo / RCIG): fitted after mean/std normalisation, regulariser ``reg * tr(Σ) / d`` added to the
  biased covariance, with "rank control" when there are fewer images than pixels (:func:`fit_zca_trace`).
- ``"kornia"`` (MTT / APM): ``kornia.enhance.ZCAWhitening(eps=0.1)`` fitted on images in [0, 1] without mean/std
  normalisation, unbiased covariance, absolute ``eps`` (:func:`fit_zca_kornia`).

Distilled images live in model-input space, so whatever was applied to the training images must be applied to the
test images too; :class:`Preprocessing` carries everything needed and serialises to plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

ZCA_CONVENTIONS = ("none", "kornia", "trace")


class ZCAFit(NamedTuple):
    """A fitted ZCA transform on flattened images: ``white = (x - mean) @ matrix``, ``x = white @ inverse + mean``.

    Attributes:
        matrix: ``(d, d)`` whitening matrix (symmetric).
        inverse: ``(d, d)`` inverse of ``matrix``.
        mean: ``(d,)`` per-feature mean subtracted before whitening.
    """

    matrix: Tensor
    inverse: Tensor
    mean: Tensor


def _flatten(x: Tensor) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def fit_zca_trace(x: Tensor, reg: float = 0.1, chunk_size: int = 4096) -> ZCAFit:
    """Fit ZCA whitening with the trace-relative regulariser of KIP / FRePo / RCIG.

    Flatten to ``d`` features, subtract the per-feature mean ``μ``, ``Σ = XᵀX / n`` (biased),
    ``r = reg · tr(Σ) / d``, eigendecomposition ``Σ + rI = U diag(s) Uᵀ`` (eigenvalues in descending order),
    then ``W = U diag(s^-1/2) Uᵀ`` and ``W⁻¹ = U diag(s^1/2) Uᵀ``. Rank control: when ``n < d`` the eigenvalues past
    index ``n`` are replaced by 1, so directions the data cannot estimate are left unscaled.

    Everything is computed in float64 on ``x``'s device; the covariance is accumulated in chunks so that the
    float64 copy of the data never exists in full.

    Args:
        x: ``(N, ...)`` images (usually already mean/std normalised), any floating dtype.
        reg: Regulariser as a fraction of the mean eigenvalue ``tr(Σ)/d``; must be > 0 unless Σ has full rank.
        chunk_size: Rows per float64 chunk when accumulating the mean and covariance.

    Returns:
        The float64 :class:`ZCAFit`.
    """
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    flat = _flatten(x)
    n, d = flat.shape
    if n < 1:
        raise ValueError("fit_zca_trace needs at least one image")
    mean = torch.zeros(d, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(chunk_size):
        mean += chunk.to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(chunk_size):
        centred = chunk.to(torch.float64) - mean
        cov.addmm_(centred.T, centred)
    cov /= n
    ridge = reg * torch.trace(cov) / d
    cov.diagonal().add_(ridge)
    evals, evecs = torch.linalg.eigh(cov)
    # eigh sorts ascending; the rank-control convention counts from the largest eigenvalue.
    evals, evecs = evals.flip(0), evecs.flip(1)
    if n < d:
        evals[n:] = 1.0
    # Round-off can leave tiny negative eigenvalues when reg == 0 and Σ is singular.
    evals = evals.clamp_min(torch.finfo(torch.float64).tiny)
    matrix = (evecs * evals.rsqrt()) @ evecs.T
    inverse = (evecs * evals.sqrt()) @ evecs.T
    return ZCAFit(matrix, inverse, mean)


def fit_zca_kornia(x: Tensor, eps: float = 0.1) -> ZCAFit:
    """Fit ZCA whitening the way MTT / APM do, with ``kornia.enhance.zca_mean``.

    kornia uses the unbiased covariance and adds ``eps`` to every eigenvalue (an absolute regulariser, unlike
    :func:`fit_zca_trace`). MTT calls ``ZCAWhitening(eps=0.1, compute_inv=True)`` on images in [0, 1] that were not
    mean/std normalised. kornia computes the decomposition in float64 and returns ``x``'s dtype (float32 at least).

    Args:
        x: ``(N, ...)`` images, floating point.
        eps: kornia's ``eps`` (MTT uses 0.1; kornia's own default is 1e-6).

    Returns:
        The :class:`ZCAFit` in ``x``'s dtype.
    """
    from kornia.enhance import zca_mean

    flat = _flatten(x)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    matrix, mean, inverse = zca_mean(flat, dim=0, unbiased=True, eps=float(eps), return_inverse=True)
    assert inverse is not None
    return ZCAFit(matrix, inverse, mean.reshape(-1))


@dataclass(kw_only=True, eq=False)  # tensor fields: == would be ambiguous
class Preprocessing:
    """Maps images in [0, 1] to model-input space and back.

    ``apply`` computes ``(x - mean) / std`` per channel, then, if ``zca != "none"``, flattens each image and computes
    ``(x - zca_mean) @ zca_matrix``. ``invert`` undoes both. No normalisation is expressed as mean 0, std 1.

    Attributes:
        mean: Per-channel mean subtracted from [0, 1] images.
        std: Per-channel standard deviation divided by.
        zca: ZCA convention: ``"none"``, ``"kornia"`` or ``"trace"`` (recorded so exported sets say how they were made).
        zca_matrix: ``(d, d)`` whitening matrix with ``d = C·H·W``, or None without ZCA.
        zca_inverse: ``(d, d)`` inverse of ``zca_matrix``, or None.
        zca_mean: ``(d,)`` mean subtracted before whitening (in normalised space), or None.
        image_shape: ``(C, H, W)``.
    """

    mean: list[float]
    std: list[float]
    zca: str = "none"
    zca_matrix: Tensor | None = None
    zca_inverse: Tensor | None = None
    zca_mean: Tensor | None = None
    image_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        self.mean = [float(m) for m in self.mean]
        self.std = [float(s) for s in self.std]
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        channels = self.image_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got {len(self.mean)} and {len(self.std)}"
            )
        if self.zca not in ZCA_CONVENTIONS:
            raise ValueError(f"zca must be one of {ZCA_CONVENTIONS}, got {self.zca!r}")
        if self.zca != "none":
            d = channels * self.image_shape[1] * self.image_shape[2]
            for field in ("zca_matrix", "zca_inverse", "zca_mean"):
                value = getattr(self, field)
                expected = (d,) if field == "zca_mean" else (d, d)
                if value is None or tuple(value.shape) != expected:
                    got = None if value is None else tuple(value.shape)
                    raise ValueError(f"zca={self.zca!r} needs {field} of shape {expected}, got {got}")

    @classmethod
    def identity(cls, image_shape: tuple[int, int, int]) -> Preprocessing:
        """No normalisation and no ZCA: model-input space is [0, 1]."""
        channels = int(image_shape[0])
        return cls(mean=[0.0] * channels, std=[1.0] * channels, image_shape=image_shape)

    @classmethod
    def fit(
        cls,
        x01: Tensor,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        zca: str = "none",
        zca_reg: float = 0.1,
    ) -> Preprocessing:
        """Build a preprocessing from training images, fitting ZCA on them after the mean/std step.

        Args:
            x01: ``(N, C, H, W)`` training images in [0, 1].
            mean: Per-channel mean, or None for no normalisation.
            std: Per-channel std, or None for no normalisation.
            zca: ``"none"``, ``"kornia"`` (``zca_reg`` is kornia's ``eps``) or ``"trace"``.
            zca_reg: The ZCA regulariser of the chosen convention.

        Returns:
            The fitted preprocessing, its ZCA tensors in float32 on the CPU.
        """
        shape = tuple(x01.shape[1:])
        base = cls.identity(shape) if mean is None or std is None else cls(mean=mean, std=std, image_shape=shape)
        if zca == "none":
            return base
        fit = fit_zca(base.apply(x01), zca, zca_reg)
        return base.with_zca(zca, fit)

    def with_zca(self, zca: str, fit: ZCAFit, dtype: torch.dtype = torch.float32) -> Preprocessing:
        """A copy with the given ZCA fit attached, stored on the CPU in ``dtype`` (float32 halves export size)."""
        return Preprocessing(
            mean=list(self.mean),
            std=list(self.std),
            zca=zca,
            zca_matrix=fit.matrix.detach().to("cpu", dtype).contiguous(),
            zca_inverse=fit.inverse.detach().to("cpu", dtype).contiguous(),
            zca_mean=fit.mean.detach().reshape(-1).to("cpu", dtype).contiguous(),
            image_shape=self.image_shape,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Preprocessing:
        """A copy whose ZCA tensors live on ``device`` / in ``dtype`` (saves a transfer per ``apply`` call)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return Preprocessing(
            mean=list(self.mean),
            std=list(self.std),
            zca=self.zca,
            zca_matrix=move(self.zca_matrix),
            zca_inverse=move(self.zca_inverse),
            zca_mean=move(self.zca_mean),
            image_shape=self.image_shape,
        )

    def _channel_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def _check(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}: convert uint8 images with x.float() / 255")
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"expected images of shape (..., {self.image_shape}), got {tuple(x.shape)}")

    def apply(self, x01: Tensor) -> Tensor:
        """Map ``(..., C, H, W)`` images in [0, 1] to model-input space (differentiable)."""
        self._check(x01)
        mean, std = self._channel_stats(x01)
        x = (x01 - mean) / std
        if self.zca == "none":
            return x
        assert self.zca_matrix is not None and self.zca_mean is not None
        flat = x.reshape(-1, self.zca_matrix.shape[0])
        matrix = self.zca_matrix.to(device=x.device, dtype=x.dtype)
        zmean = self.zca_mean.to(device=x.device, dtype=x.dtype)
        return ((flat - zmean) @ matrix).reshape(x.shape)

    def invert(self, x: Tensor) -> Tensor:
        """Map model-input images back to [0, 1] space for viewing (no clamping, so values may leave [0, 1])."""
        self._check(x)
        if self.zca != "none":
            assert self.zca_inverse is not None and self.zca_mean is not None
            flat = x.reshape(-1, self.zca_inverse.shape[0])
            inverse = self.zca_inverse.to(device=x.device, dtype=x.dtype)
            zmean = self.zca_mean.to(device=x.device, dtype=x.dtype)
            x = (flat @ inverse + zmean).reshape(x.shape)
        mean, std = self._channel_stats(x)
        return x * std + mean

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, lists, strings and ints only, so ``torch.load(..., weights_only=True)`` reads it back."""

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().contiguous()

        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "zca": self.zca,
            "zca_matrix": cpu(self.zca_matrix),
            "zca_inverse": cpu(self.zca_inverse),
            "zca_mean": cpu(self.zca_mean),
            "image_shape": list(self.image_shape),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            mean=list(d["mean"]),
            std=list(d["std"]),
            zca=str(d.get("zca", "none")),
            zca_matrix=d.get("zca_matrix"),
            zca_inverse=d.get("zca_inverse"),
            zca_mean=d.get("zca_mean"),
            image_shape=tuple(d["image_shape"]),  # type: ignore[arg-type]
        )


def fit_zca(x: Tensor, zca: str, reg: float) -> ZCAFit:
    """Dispatch to the fit function of convention ``zca`` (``"kornia"`` or ``"trace"``)."""
    if zca == "trace":
        return fit_zca_trace(x, reg=reg)
    if zca == "kornia":
        return fit_zca_kornia(x, eps=reg)
    raise ValueError(f"no ZCA fit for zca={zca!r}: use 'kornia' or 'trace'")
