"""Learning-rate schedules whose horizon can come from the run (``trainer.max_steps``) instead of the recipe."""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class HorizonSchedule(LambdaLR):
    """A closed-form multiplier of ``t / total_steps`` whose horizon may come from the run instead of the recipe.

    With ``total_steps=None`` the horizon is taken from the run: :class:`~lightning_distill.methods.DistillationMethod`
    calls :meth:`set_horizon` with ``trainer.max_steps`` when it builds the optimiser (and again when a
    :class:`~lightning_distill.callbacks.TimeBudget` chooses the horizon from the measured step time); a resumed run
    then uses its own horizon again. A horizon given here is kept and checkpointed. Subclasses define
    :meth:`multiplier` of the progress ``min(t, T) / T``.

    Args:
        optimizer: the wrapped optimiser.
        total_steps: the schedule's length in outer steps; ``None`` to take it from the run.
        last_epoch: index of the last step (``-1`` to start afresh), as in ``torch.optim.lr_scheduler``.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, last_epoch: int = -1) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive (or None for trainer.max_steps), got {total_steps}")
        self.total_steps = total_steps
        self.horizon_from_run = total_steps is None
        super().__init__(optimizer, self.factor, last_epoch)

    def set_horizon(self, total_steps: int) -> None:
        """Set the schedule's length when the recipe left it to the run (no effect when ``total_steps`` was given)."""
        if not self.horizon_from_run:
            return
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"{type(self).__name__} needs a horizon: give it total_steps, or give the trainer max_steps (it is -1 "
                "or None), or a lightning_distill.callbacks.TimeBudget"
            )
        self.total_steps = int(total_steps)

    def multiplier(self, t: int, total: int) -> float:
        """The learning-rate multiplier after ``t`` of ``total`` steps."""
        raise NotImplementedError

    def factor(self, t: int) -> float:
        """The learning-rate multiplier after ``t`` steps."""
        total = self.total_steps
        if total is None:
            if t == 0:  # LambdaLR evaluates step 0 on construction, before the run sets the horizon
                return 1.0
            raise RuntimeError(
                f"{type(self).__name__} has no horizon: give total_steps or call set_horizon(trainer.max_steps)"
            )
        return self.multiplier(t, total)

    def state_dict(self) -> dict[str, Any]:
        # The multiplier is a bound method: LambdaLR would store its __dict__; nothing of it needs saving.
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state.pop("lr_lambdas", None)
        if self.horizon_from_run and state.get("horizon_from_run", True):
            # A horizon taken from the run follows the resumed run's, as it was set before this load.
            state["total_steps"] = self.total_steps
        self.__dict__.update(state)


class CosineDecay(HorizonSchedule):
    """Cosine decay of every group's learning rate to ``final_ratio`` times itself over ``total_steps``, then flat.

    ``lr_t = lr · (final_ratio + (1 - final_ratio) · ½ (1 + cos(π · min(t, T) / T)))``, stepped once per outer step
    (FRePo: LAMB at 3e-4 decayed to 3e-5). Written on ``LambdaLR`` rather than ``CosineAnnealingLR`` because the
    latter is periodic past ``T_max`` and, stepped, computes the rate recursively, which drifts from the closed form.
    The horizon follows :class:`HorizonSchedule`.

    Args:
        optimizer: the wrapped optimiser.
        total_steps: the decay's length in outer steps; ``None`` to take ``trainer.max_steps``.
        final_ratio: the final learning rate as a fraction of the initial one.
        last_epoch: index of the last step (``-1`` to start afresh), as in ``torch.optim.lr_scheduler``.
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int | None = None, final_ratio: float = 0.1, last_epoch: int = -1
    ) -> None:
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
        self.final_ratio = float(final_ratio)
        super().__init__(optimizer, total_steps, last_epoch)

    def multiplier(self, t: int, total: int) -> float:
        p = min(t, total) / total
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class StepDecay(HorizonSchedule):
    """The learning rate times ``gamma`` at each of ``fractions`` of the horizon (``MultiStepLR`` at run fractions).

    ``lr_t = lr · gamma^#{f : t >= floor(f · T)}``. APM decays ``lr_img`` by 0.3 at half of its iterations; written
    on :class:`HorizonSchedule` rather than ``MultiStepLR`` so the milestones follow a horizon chosen by the run (a
    wall-clock budget) instead of being fixed when the optimiser is built.

    Args:
        optimizer: the wrapped optimiser.
        total_steps: the horizon in outer steps; ``None`` to take ``trainer.max_steps``.
        fractions: where the decays come, as fractions of the horizon in (0, 1].
        gamma: the factor applied at each.
        last_epoch: index of the last step (``-1`` to start afresh), as in ``torch.optim.lr_scheduler``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        fractions: tuple[float, ...] = (0.5,),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        fractions = tuple(float(f) for f in fractions)
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"fractions must be in (0, 1], got {fractions}")
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.fractions = fractions
        self.gamma = float(gamma)
        super().__init__(optimizer, total_steps, last_epoch)

    def milestones(self, total: int) -> list[int]:
        """The steps from which each decay applies, for a horizon of ``total`` steps."""
        return [int(f * total) for f in self.fractions]

    def multiplier(self, t: int, total: int) -> float:
        return self.gamma ** sum(t >= m for m in self.milestones(total))
