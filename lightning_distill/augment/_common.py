"""Sampling helpers shared by the augmentation modules: explicit generators only, never the global RNG."""

from __future__ import annotations

import torch

AugParams = dict[str, "torch.Tensor | str"]


def parse_ops(ops: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Split an underscore-joined op string and check every name.

    Args:
        ops: e.g. ``"color_crop_cutout_flip_scale_rotate"``.
        known: the accepted op names.
        what: the owner's name, for the error message.

    Returns:
        The op names in the given order.

    Raises:
        ValueError: on an empty string, an unknown name or a repeated name.
    """
    names = tuple(n for n in ops.split("_") if n)
    if not names:
        raise ValueError(f"{what}: no ops given in {ops!r}; known ops: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown op(s) {unknown} in {ops!r}; known ops: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: repeated op in {ops!r}; known ops: {', '.join(known)}")
    return names


def uniform(generator: torch.Generator, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Draw ``n`` float32 values from ``U[low, high)`` on the generator's own device."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return u * (high - low) + low


def randint(generator: torch.Generator, n: int, high: int) -> torch.Tensor:
    """Draw ``n`` int64 values uniformly from ``{0, ..., high - 1}`` on the generator's own device."""
    return torch.randint(0, high, (n,), generator=generator, device=generator.device)


def unit_to_int(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Map unit draws ``u ∈ [0, 1)`` to integers uniform on ``{low, ..., high}`` (inclusive), as float."""
    # Size-dependent params are stored as unit draws so one draw can be replayed on images of any size; this turns
    # them into the same distribution as randint(low, high + 1).
    return torch.floor(u * (high - low + 1)).clamp(max=high - low) + low


def to_device(params: AugParams, device: torch.device | str | None) -> AugParams:
    """Move every tensor in ``params`` to ``device`` (``None`` leaves them where they are)."""
    if device is None:
        return params
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}


def check_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator`` or raise: augmentation never falls back to the global RNG."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "augmentation needs an explicit torch.Generator (generator=...) or replayed params (params=...); "
            "it never draws from the global RNG"
        )
    return generator
