"""Member subsets of a training split: which real images a distilled set (or a baseline network) was built from.

A membership-inference evaluation needs to know exactly which training images were used. FRePo distils from one
chunk of the training split (2000 images, chosen by index) and treats that chunk as the members; these functions
pick such a chunk as indices into the raw training split, so an export can record them and an evaluation can rebuild
the members from the raw data plus the recorded preprocessing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chunk_indices(n_images: int, chunk: int, chunk_size: int, seed: int | None = None) -> Tensor:
    """Sorted int64 indices of chunk ``chunk`` (0-based) of ``chunk_size`` images out of ``n_images``.

    Args:
        n_images: size of the split the indices refer to.
        chunk: which chunk; chunks are disjoint, so chunk 0 and chunk 1 share no image.
        chunk_size: images per chunk.
        seed: ``None`` cuts the chunks from the split in its stored order (FRePo's ``chunk_idx``); an integer cuts them
            from a permutation drawn with that seed (a random, class-mixed subset that does not depend on how the
            files happen to be ordered).

    Raises:
        ValueError: for a negative chunk, a chunk size below 1, or a chunk that runs past the end of the split.
    """
    if chunk_size < 1 or chunk < 0:
        raise ValueError(f"need chunk >= 0 and chunk_size >= 1, got chunk={chunk}, chunk_size={chunk_size}")
    start, stop = chunk * chunk_size, (chunk + 1) * chunk_size
    if stop > n_images:
        raise ValueError(
            f"chunk {chunk} of {chunk_size} images needs images {start}..{stop - 1}, but the split has {n_images}: "
            f"pass a chunk below {n_images // chunk_size} or a smaller chunk size"
        )
    order = torch.arange(n_images) if seed is None else torch.randperm(n_images, generator=_generator(seed))
    # Sorted so the members keep the dataset's order; only which images belong is chosen above.
    return order[start:stop].sort().values


def complement(indices: Tensor, n_images: int) -> Tensor:
    """Sorted int64 indices in ``[0, n_images)`` that are not in ``indices``."""
    keep = torch.ones(n_images, dtype=torch.bool)
    keep[indices] = False
    return keep.nonzero().flatten()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
