"""Learning-rate schedules whose horizon can come from the run (``trainer.max_steps``) instead of the recipe."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class CosineDecay(LambdaLR):
    """Cosine decay of every group's learning rate to ``final_ratio`` times itself over ``total_steps``, then flat.

    ``lr_t = lr · (final_ratio + (1 - final_ratio) · ½ (1 + cos(π · min(t, T) / T)))``, stepped once per outer step
    (FRePo: LAMB at 3e-4 decayed to 3e-5). Written on ``LambdaLR`` rather than ``CosineAnnealingLR`` because the
    latter is periodic past ``T_max`` and, stepped, computes the rate recursively, which drifts from the closed form.

    With ``total_steps=None`` the horizon is taken from the run: :class:`~lightning_distill.methods.DistillationMethod`
    calls :meth:`set_horizon` with ``trainer.max_steps`` when it builds the optimiser, and a resumed run then uses its
    own ``max_steps`` again (a horizon given here is kept and checkpointed).

    Args:
        optimizer: the wrapped optimiser.
        total_steps: the decay's length in outer steps; ``None`` to take ``trainer.max_steps``.
        final_ratio: the final learning rate as a fraction of the initial one.
        last_epoch: index of the last step (``-1`` to start afresh), as in ``torch.optim.lr_scheduler``.
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int | None = None, final_ratio: float = 0.1, last_epoch: int = -1
    ) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive (or None for trainer.max_steps), got {total_steps}")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
        self.total_steps = total_steps
        self.final_ratio = float(final_ratio)
        self.horizon_from_run = total_steps is None
        super().__init__(optimizer, self.factor, last_epoch)

    def set_horizon(self, total_steps: int) -> None:
        """Set the decay length when the recipe left it to the run (no effect when ``total_steps`` was given)."""
        if not self.horizon_from_run:
            return
        if total_steps is None or total_steps < 1:
            raise ValueError(
                "CosineDecay needs a horizon: give it total_steps, or give the trainer max_steps (it is -1 or None)"
            )
        self.total_steps = int(total_steps)

    def factor(self, t: int) -> float:
        """The learning-rate multiplier after ``t`` steps."""
        total = self.total_steps
        if total is None:
            if t == 0:  # LambdaLR evaluates step 0 on construction, before the run sets the horizon
                return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(0.0))
            raise RuntimeError("CosineDecay has no horizon: give total_steps or call set_horizon(trainer.max_steps)")
        p = min(t, total) / total
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    def state_dict(self) -> dict[str, Any]:
        # The multiplier is a bound method: LambdaLR would store its __dict__; nothing of it needs saving.
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.pop("lr_lambdas", None)
        if self.horizon_from_run and state.get("horizon_from_run", True):
            # A horizon taken from the run follows the resumed run's max_steps, as it was set before this load.
            state["total_steps"] = self.total_steps
        self.__dict__.update(state)
