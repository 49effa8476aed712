"""Parameter dicts as flat vectors and back (the iterative solvers work on one flat vector)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten"]


def flatten(tree: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> Tensor:
    """Concatenate the tensors of ``tree`` (in ``keys`` order, default the dict's) into one flat vector."""
    keys = list(tree) if keys is None else list(keys)
    return torch.cat([tree[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)


def unflatten(vec: Tensor, like: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (views of ``vec``; the inverse of :func:`flatten`).

    Raises:
        ValueError: If the vector's length is not the total size of the tensors.
    """
    keys = list(like) if keys is None else list(keys)
    sizes = [like[k].numel() for k in keys]
    if vec.dim() != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match {sum(sizes)} parameters")
    return {k: part.view_as(like[k]) for k, part in zip(keys, torch.split(vec, sizes), strict=True)}
