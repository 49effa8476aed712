"""The endless, seeded, resumable streams of real batches served to the outer loop.

:class:`RealBatchStream` serves uniform batches; the class-aware streams of :mod:`lightning_distill.data.samplers`
(:class:`ClassBalancedStream`, :class:`ClassSubsetStream`) share its contract and are exported here beside it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from lightning_distill.data.samplers import ClassBalancedStream, ClassSubsetStream

__all__ = ["ClassBalancedStream", "ClassSubsetStream", "RealBatchStream"]


class RealBatchStream:
    """Endless, seeded stream of uniform random ``(x_real, y_real)`` batches from tensors already on the device.

    Batches walk through seeded random permutations of the whole training tensor (so every image is seen once per
    pass); only an index tensor is built per batch. A private CPU ``torch.Generator`` drives the order, so the batches
    do not depend on the device or on the global RNG. ``iter()`` continues where the stream stands; the state
    (generator, permutation, position) round-trips through ``state_dict`` so Lightning restores it on resume.

    Args:
        x: ``(N, C, H, W)`` images in model-input space.
        y: ``(N,)`` labels.
        batch_size: Images per batch (may exceed ``N``: the batch then spans several permutations).
        seed: Seed of the private generator.
        lookahead: Batches drawn but not yet consumed when ``state_dict`` is called; its state is the one before
            them. Lightning's training loop prefetches one batch, so the DataModule passes 1 under a Trainer and a
            resumed run continues with exactly the batch the interrupted one would have used next.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, lookahead: int = 0) -> None:
        if len(x) == 0:
            raise ValueError("the training split is empty: lower val_size")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.lookahead = int(lookahead)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0
        # States before each of the last `lookahead` draws (permutations are replaced, never modified: no copies).
        self._history: deque[tuple[Tensor, Tensor, int]] = deque(maxlen=max(self.lookahead, 1))

    def _snapshot(self) -> tuple[Tensor, Tensor, int]:
        return self._generator.get_state(), self._order, self._pos

    def __iter__(self) -> RealBatchStream:
        return self

    def next_indices(self) -> Tensor:
        """The next batch's indices into the training tensor (CPU int64), advancing the stream."""
        self._history.append(self._snapshot())
        n = len(self.x)
        parts: list[Tensor] = []
        needed = self.batch_size
        while needed > 0:
            if self._pos >= len(self._order):
                self._order = torch.randperm(n, generator=self._generator)
                self._pos = 0
            take = min(needed, n - self._pos)
            parts.append(self._order[self._pos : self._pos + take])
            self._pos += take
            needed -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __next__(self) -> tuple[Tensor, Tensor]:
        idx = self.next_indices().to(self.x.device, non_blocking=True)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """Generator state, permutation and position before the last ``lookahead`` draws (tensors and ints)."""
        if self.lookahead and len(self._history) >= self.lookahead:
            generator, order, pos = self._history[-self.lookahead]
        else:
            generator, order, pos = self._snapshot()
        return {"generator": generator, "order": order.clone(), "pos": pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self._pos = int(state["pos"])
        self._history.clear()
