"""Class-aware real-batch streams: class-balanced batches and batches from a subset of classes.

They share :class:`~lightning_distill.data.stream.RealBatchStream`'s contract: endless, driven by a private CPU
``torch.Generator`` (independent of the device and the global RNG), ``next_indices()`` and ``__next__``, and a
``state_dict`` taken before the last ``lookahead`` draws so a resumed run continues with the batch the interrupted
one would have used next. Each class keeps its own seeded permutation, so every image of a class is seen once per
pass over that class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassBalancedStream", "ClassSubsetStream"]

_MASK63 = (1 << 63) - 1


def _side_seed(seed: int) -> int:
    """A seed unrelated to ``seed`` (one splitmix64 round), for the per-class helper stream."""
    z = (seed + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


class _ClassOrders:
    """Seeded per-class permutations of global indices, walked by ``take``.

    Permutations are replaced, never modified, so a snapshot only copies the lists that hold them.
    """

    def __init__(self, class_indices: list[Tensor], seed: int) -> None:
        self.class_indices = class_indices
        self.generator = torch.Generator().manual_seed(seed)
        self.orders: list[Tensor] = [torch.empty(0, dtype=torch.int64)] * len(class_indices)
        self.pos: list[int] = [0] * len(class_indices)

    def take(self, c: int, n: int) -> Tensor:
        """The next ``n`` indices of class ``c`` (spanning permutations when ``n`` exceeds the class size)."""
        members = self.class_indices[c]
        parts: list[Tensor] = []
        while n > 0:
            if self.pos[c] >= len(self.orders[c]):
                self.orders[c] = members[torch.randperm(len(members), generator=self.generator)]
                self.pos[c] = 0
            k = min(n, len(self.orders[c]) - self.pos[c])
            parts.append(self.orders[c][self.pos[c] : self.pos[c] + k])
            self.pos[c] += k
            n -= k
        if not parts:
            return torch.empty(0, dtype=torch.int64)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def snapshot(self) -> tuple[Tensor, list[Tensor], list[int]]:
        return self.generator.get_state(), list(self.orders), list(self.pos)

    def restore(self, generator: Tensor, orders: Sequence[Tensor], pos: Sequence[int]) -> None:
        if len(orders) != len(self.class_indices) or len(pos) != len(self.class_indices):
            raise ValueError(f"state holds {len(orders)} classes, the stream has {len(self.class_indices)}")
        self.generator.set_state(generator)
        self.orders = [o.clone() for o in orders]
        self.pos = [int(p) for p in pos]


class _PerClassStream:
    """Base of the class-aware streams: per-class orders, the remainder rotation, lookahead and state."""

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, seed: int, lookahead: int, num_classes: int | None, shuffle: bool
    ) -> None:
        if len(x) == 0:
            raise ValueError("the training split is empty: lower val_size")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.lookahead = int(lookahead)
        self.shuffle = bool(shuffle)
        labels = y.detach().cpu().long()
        if labels.min() < 0:
            raise ValueError("labels must be non-negative class indices")
        self.num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.max() >= self.num_classes:
            raise ValueError(f"labels reach {int(labels.max())} but num_classes is {self.num_classes}")
        # One stable sort instead of a mask per class: class c's indices, ascending.
        counts = torch.bincount(labels, minlength=self.num_classes)
        self._class_indices = list(torch.argsort(labels, stable=True).split(counts.tolist()))
        self.class_counts: list[int] = counts.tolist()
        self._orders = _ClassOrders(self._class_indices, self.seed)
        # per_class_batch() is called by the method inside a step, not prefetched by the loop, so it walks its own
        # orders whose state is saved as it stands (the lookahead rewind only concerns next_indices()).
        self._side_orders = _ClassOrders(self._class_indices, _side_seed(self.seed))
        self._batches = 0
        self.last_classes: Tensor | None = None
        self._history: deque[tuple[Any, ...]] = deque(maxlen=max(self.lookahead, 1))

    def _check_classes(self, classes: Sequence[int]) -> None:
        for c in classes:
            if not 0 <= c < self.num_classes:
                raise ValueError(f"class {c} out of range for {self.num_classes} classes")
            if self.class_counts[c] == 0:
                raise ValueError(f"class {c} has no training images")

    def _choose_classes(self) -> Tensor:
        raise NotImplementedError

    def _counts(self, k: int) -> list[int]:
        """Images per chosen class: ``batch_size // k`` each, the remainder to ``r`` chosen classes rotating by
        ``r`` per batch, so over a few batches every class position gets the same share."""
        base, r = divmod(self.batch_size, k)
        counts = [base] * k
        start = (self._batches * r) % k
        for j in range(r):
            counts[(start + j) % k] += 1
        return counts

    def _snapshot(self) -> tuple[Any, ...]:
        return (*self._orders.snapshot(), self._batches)

    def __iter__(self) -> _PerClassStream:
        return self

    def next_indices(self) -> Tensor:
        """The next batch's indices into the training tensor (CPU int64), advancing the stream."""
        self._history.append(self._snapshot())
        chosen = self._choose_classes()
        counts = self._counts(len(chosen))
        parts = [self._orders.take(c, n) for c, n in zip(chosen.tolist(), counts, strict=True)]
        idx = torch.cat(parts)
        if self.shuffle:
            # Without it the batch is grouped by class, and any prefix of it would miss classes.
            idx = idx[torch.randperm(len(idx), generator=self._orders.generator)]
        self._batches += 1
        self.last_classes = chosen
        return idx

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = self.next_indices().to(self.x.device, non_blocking=True)
        return self.x[idx], self.y[idx]

    def per_class_indices(self, c: int, n: int) -> Tensor:
        """``n`` indices of class ``c`` from a separate seeded per-class stream (each image once per pass).

        It does not touch the batch stream, and its position is saved as it stands by :meth:`state_dict`.
        """
        self._check_classes([c])
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._side_orders.take(c, n)

    def per_class_batch(self, c: int, n: int) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``n`` images of class ``c`` (see :meth:`per_class_indices`), on the data's device."""
        idx = self.per_class_indices(c, n).to(self.x.device, non_blocking=True)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """Generator states, per-class permutations and positions, batch count (before the last ``lookahead``
        draws), plus the per-class helper stream as it stands (tensors, ints and lists)."""
        if self.lookahead and len(self._history) >= self.lookahead:
            generator, orders, pos, batches = self._history[-self.lookahead]
        else:
            generator, orders, pos, batches = self._snapshot()
        side_generator, side_orders, side_pos = self._side_orders.snapshot()
        return {
            "generator": generator,
            "orders": [o.clone() for o in orders],
            "pos": list(pos),
            "batches": batches,
            "side_generator": side_generator,
            "side_orders": [o.clone() for o in side_orders],
            "side_pos": list(side_pos),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._orders.restore(state["generator"], state["orders"], state["pos"])
        self._side_orders.restore(state["side_generator"], state["side_orders"], state["side_pos"])
        self._batches = int(state["batches"])
        self.last_classes = None
        self._history.clear()


class ClassBalancedStream(_PerClassStream):
    """Endless, seeded stream of class-balanced ``(x_real, y_real)`` batches from tensors already on the device.

    Every batch holds ``batch_size // num_classes`` images of every class; the ``batch_size % num_classes`` extra
    images go to consecutive classes, rotating from batch to batch, so each class gets the same share over
    ``num_classes / gcd`` batches. Each class walks its own seeded permutation, so every image of a class is seen
    once per pass over that class (small classes are passed over more often).

    Args:
        x: ``(N, C, H, W)`` images in model-input space.
        y: ``(N,)`` integer labels.
        batch_size: Images per batch.
        seed: Seed of the private generator.
        lookahead: As in :class:`~lightning_distill.data.stream.RealBatchStream` (1 under a Trainer).
        num_classes: Number of classes (default ``max(y) + 1``); every class needs at least one image.
        shuffle: Shuffle each batch (otherwise it is grouped by class).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        seed: int,
        lookahead: int = 0,
        num_classes: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__(x, y, batch_size, seed, lookahead, num_classes, shuffle)
        self._check_classes(range(self.num_classes))
        self._all = torch.arange(self.num_classes)

    def _choose_classes(self) -> Tensor:
        return self._all


class ClassSubsetStream(_PerClassStream):
    """Endless, seeded stream of batches drawn from a subset of the classes (BPTT's task sampling).

    The subset is either a fixed list of classes, or ``classes_per_batch`` classes drawn afresh (uniformly,
    without replacement, among classes that have images) for every batch. Within a batch the chosen classes are
    balanced as in :class:`ClassBalancedStream`, each class walking its own seeded permutation. The classes of
    the most recent batch are in :attr:`last_classes` (in draw order).

    Args:
        x: ``(N, C, H, W)`` images in model-input space.
        y: ``(N,)`` integer labels.
        batch_size: Images per batch.
        seed: Seed of the private generator.
        lookahead: As in :class:`~lightning_distill.data.stream.RealBatchStream` (1 under a Trainer).
        classes: The fixed subset of classes (exclusive with ``classes_per_batch``).
        classes_per_batch: Number of classes drawn per batch (exclusive with ``classes``).
        num_classes: Number of classes (default ``max(y) + 1``).
        shuffle: Shuffle each batch (otherwise it is grouped by class).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        seed: int,
        lookahead: int = 0,
        classes: Sequence[int] | None = None,
        classes_per_batch: int | None = None,
        num_classes: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__(x, y, batch_size, seed, lookahead, num_classes, shuffle)
        if (classes is None) == (classes_per_batch is None):
            raise ValueError("give exactly one of classes (a fixed subset) and classes_per_batch (drawn per batch)")
        self.classes: list[int] | None = None
        self.classes_per_batch: int | None = None
        if classes is not None:
            self.classes = [int(c) for c in classes]
            if not self.classes or len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes must be a non-empty list of distinct classes, got {classes!r}")
            self._check_classes(self.classes)
            self._fixed = torch.tensor(self.classes, dtype=torch.int64)
        else:
            self._available = torch.tensor([c for c, n in enumerate(self.class_counts) if n > 0], dtype=torch.int64)
            if not 1 <= int(classes_per_batch) <= len(self._available):
                raise ValueError(
                    f"classes_per_batch must be in [1, {len(self._available)}] (classes with images), "
                    f"got {classes_per_batch}"
                )
            self.classes_per_batch = int(classes_per_batch)

    def _choose_classes(self) -> Tensor:
        if self.classes is not None:
            return self._fixed
        pick = torch.randperm(len(self._available), generator=self._orders.generator)[: self.classes_per_batch]
        return self._available[pick]
