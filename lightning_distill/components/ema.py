"""A bias-corrected exponential moving average of named tensors, kept by a method as part of its state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ParameterEMA"]


class ParameterEMA:
    """The bias-corrected EMA ``ê_t = (1 − d) Σ_i d^{t−i} x_i / (1 − d^t)`` of named tensors (RCIG's set and τ).

    Updated in place as ``ê_t = ê_{t−1} + (x_t − ê_{t−1})(1 − d)/(1 − d^t)`` (so ``ê_1 = x_1``): the optax/Adam bias
    correction of an EMA started at 0, which weights the steps as a proper average from the first one. Lightning's
    ``EMAWeightAveraging`` instead keeps weight ``d^t`` on the first value, and after ``fit`` copies the average into
    the live module, so a checkpoint saved then cannot resume the live run exactly; a method that owns its EMA
    (checkpointed with the method's state) has neither issue.

    Args:
        decay: ``d`` in ``[0, 1)``.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.count = 0
        self.values: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, Tensor]) -> None:
        """Take in the current values (detached copies are kept)."""
        self.count += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay**self.count)
        for name, t in tensors.items():
            if name not in self.values or self.count == 1:
                self.values[name] = t.detach().clone()
            else:
                avg = self.values[name]
                avg.add_((t.detach().to(avg) - avg) * weight)

    @contextmanager
    def swapped(self, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
        """Within the block, the parameters hold their averages (those without one keep their value)."""
        saved = {}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    if name in self.values:
                        saved[name] = p.detach().clone()
                        p.copy_(self.values[name])
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loads with ``weights_only=True``)."""
        return {"decay": self.decay, "count": self.count, "values": {k: v.clone() for k, v in self.values.items()}}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict` (the configured decay stays)."""
        self.count = int(state["count"])
        self.values = {
            k: v.detach().clone().to(device) if device is not None else v.detach().clone()
            for k, v in state["values"].items()
        }
