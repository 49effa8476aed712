"""``PixelSet``: one learnable tensor of images, with hard, soft or learnable labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_distill.functional.losses import centred_one_hot
from lightning_distill.synthetic.base import LabelKind, SyntheticSet


class PixelSet(SyntheticSet):
    """Synthetic images stored as raw pixels (in model-input space), ``ipc`` per class.

    Args:
        ipc: images per class.
        num_classes: number of classes (``None``: from the data).
        image_shape: ``(C, H, W)`` (``None``: from the data).
        init: ``"real"`` draws random real images of each class; ``"kmeans"`` takes, in each class, the real
            image nearest each centre of a k-means with ``ipc`` clusters (see :func:`select_kmeans`): real images
            that cover the class's modes instead of a random draw; ``"noise"`` draws standard normal pixels
            (the inputs are normalised, so unit variance matches the data's scale).
        labels: ``"hard"`` (class ids, fixed), ``"soft"`` (fixed float targets) or ``"learned"`` (float targets
            that the method optimises, FRePo/RCIG style).
        centred: soft/learned labels use the centred one-hot convention (1 - 1/C, -1/C) instead of one-hot.
        label_scale: multiplies the initial soft/learned labels (FRePo: 1/sqrt(C/10)); ``None`` means 1.
    """

    def __init__(
        self,
        ipc: int,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
        init: Literal["real", "kmeans", "noise"] = "real",
        labels: LabelKind = "hard",
        centred: bool = True,
        label_scale: float | None = None,
    ) -> None:
        if init not in ("real", "kmeans", "noise"):
            raise ValueError(f"init must be 'real', 'kmeans' or 'noise', got {init!r}")
        if labels not in ("hard", "soft", "learned"):
            raise ValueError(f"labels must be 'hard', 'soft' or 'learned', got {labels!r}")
        self.init = init
        self.label_kind = labels
        self.centred = centred
        self.label_scale = 1.0 if label_scale is None else float(label_scale)
        super().__init__(ipc, num_classes, image_shape)

    def check_data(self, counts: list[int], class_names: list[str]) -> None:
        """With ``init="real"`` or ``"kmeans"`` every class needs at least ``ipc`` training images."""
        if self.init == "noise":
            return
        short = [c for c, n in enumerate(counts) if n < self.ipc]
        if short:
            c = min(short, key=lambda i: counts[i])
            raise ValueError(
                f"ipc={self.ipc} needs {self.ipc} training images of every class, but class {c} ({class_names[c]}) "
                f"has {counts[c]}: use ipc <= {min(counts)} (or init: noise)"
            )

    def _build(self) -> None:
        n, (c, h, w), _k = self.num_images, self.image_shape, self.num_classes
        self.images = nn.Parameter(torch.zeros(n, c, h, w))
        if self.label_kind == "hard":
            self.register_buffer("labels", self.class_ids())
        else:
            target = self._initial_targets()
            if self.label_kind == "learned":
                self.labels = nn.Parameter(target)
            else:
                self.register_buffer("labels", target)

    def _initial_targets(self) -> Tensor:
        ids = self.class_ids()
        if self.centred:
            return centred_one_hot(ids, self.num_classes, scale=self.label_scale)
        return torch.nn.functional.one_hot(ids, self.num_classes).float() * self.label_scale

    @torch.no_grad()
    def initialise(self, x_real: Tensor, y_real: Tensor, generator: torch.Generator | None = None) -> None:
        """``ipc`` distinct real images of each class, at random or by k-means (or noise when ``init="noise"``)."""
        if not self.is_built:
            raise RuntimeError("build(num_classes, image_shape) before initialise()")
        if tuple(x_real.shape[1:]) != self.image_shape:
            raise ValueError(f"real images have shape {tuple(x_real.shape[1:])}, the set expects {self.image_shape}")
        if self.init == "noise":
            # Drawn on the generator's device (CPU), then moved: the same seed gives the same set on any device.
            self.images.copy_(torch.randn(self.images.shape, generator=generator).to(self.images))
            return
        select = select_kmeans if self.init == "kmeans" else select_real
        self.images.copy_(select(x_real, y_real, self.num_classes, self.ipc, generator).to(self.images))

    def forward(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if index is None:
            return self.images, self.labels
        index = index.to(self.images.device)
        return self.images[index], self.labels[index]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``images`` and, when learned, ``labels``: two groups, so a recipe can give labels their own rate."""
        groups = {"images": [self.images]} if self.images.requires_grad else {}
        if isinstance(self.labels, nn.Parameter) and self.labels.requires_grad:
            groups["labels"] = [self.labels]
        return groups


def select_real(
    x_real: Tensor, y_real: Tensor, num_classes: int, ipc: int, generator: torch.Generator | None
) -> Tensor:
    """``ipc`` distinct random images of each class in class order: ``(num_classes * ipc, C, H, W)``.

    Raises:
        ValueError: when a class has fewer than ``ipc`` images.
    """
    y_cpu = y_real.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} real images, fewer than ipc={ipc}")
        perm = torch.randperm(len(idx), generator=generator)[:ipc]
        picks.append(idx[perm])
    return x_real[torch.cat(picks).to(x_real.device)]


def select_kmeans(
    x_real: Tensor,
    y_real: Tensor,
    num_classes: int,
    ipc: int,
    generator: torch.Generator | None,
    max_iterations: int = 100,
) -> Tensor:
    """``ipc`` distinct real images of each class, nearest the centres of a k-means of the class.

    Returns ``(num_classes * ipc, C, H, W)`` in class order.

    A random draw of ``ipc`` images can take two from one mode of a class and none from another; the images nearest
    k-means centres cover the class, so a short distillation starts closer to a set that represents it (the idea of
    DREAM, Liu et al. 2023, used here only to choose the starting images). Per class, in pixel space:
    :func:`kmeans_pp_starts` from ``generator``, then :func:`lloyd`; each centre then takes the nearest image not
    taken by an earlier centre, so the picks are distinct real images and the same ``generator`` gives the same set.

    Raises:
        ValueError: when a class has fewer than ``ipc`` images.
    """
    y_cpu = y_real.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y_cpu == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} real images, fewer than ipc={ipc}")
        idx = idx.to(x_real.device)
        x_c = x_real[idx].flatten(1).float()
        centres = lloyd(x_c, kmeans_pp_starts(x_c, ipc, generator), max_iterations)
        dist = squared_distances(centres, x_c)
        for k in range(ipc):
            j = int(dist[k].argmin())
            picks.append(idx[j])
            dist[:, j] = float("inf")
    return x_real[torch.stack(picks)]


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
    changes or ``max_iterations``; a centre left without rows stays where it is. Returns ``(K, D)``.

    Hand-written: kornia's ``KMeans`` forms an ``(N, K, D)`` difference per iteration (140 s for MNIST at 10 images
    per class, 2 threads, where this takes a second) and draws from the global generator.
    """
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
