"""k-means in plain tensor maths: matmul distances, k-means++ seeding from a given generator, Lloyd's iterations.

Hand-written: kornia's ``KMeans`` forms an ``(N, K, D)`` difference per iteration (140 s to pick MNIST's starting
images at 10 per class on 2 threads, where these take 7 s), starts from a uniform draw and draws from the global
generator; torch has no k-means.
"""

from __future__ import annotations

import torch
from torch import Tensor


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``(M, N)`` squared Euclidean distances between the rows of ``a`` ``(M, D)`` and ``b`` ``(N, D)`` (one matmul)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)


def kmeans_pp_starts(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` rows of ``x`` ``(N, D)``, each drawn with probability
    proportional to its squared distance from the rows already drawn: ``(k, D)``. A uniform start (kornia's) can put
    two centres in one big mode and leave Lloyd's iterations sharing one centre between two small modes."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    chosen = [first]
    d2 = squared_distances(x[first : first + 1], x)[0]
    for _ in range(1, k):
        weights = d2.cpu().double()
        if weights.sum() <= 0:  # every row coincides with a chosen one: take any row not chosen yet
            weights = torch.ones(len(x), dtype=torch.float64)
            weights[chosen] = 0
        j = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(j)
        d2 = torch.minimum(d2, squared_distances(x[j : j + 1], x)[0])
    return x[chosen]


def lloyd(x: Tensor, centres: Tensor, max_iterations: int = 100) -> Tensor:
    """Lloyd's k-means iterations on the rows of ``x`` ``(N, D)`` from ``centres`` ``(K, D)``, until no assignment
    changes or ``max_iterations``; a centre left without rows stays where it is. Returns ``(K, D)``."""
    assign = None
    for _ in range(max_iterations):
        new = squared_distances(x, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        one_hot = torch.nn.functional.one_hot(assign, len(centres)).to(x.dtype)
        counts = one_hot.sum(0)
        sums = one_hot.T @ x
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres
