"""A wall-clock budget for a distillation run: the step horizon chosen from the step time measured on this machine."""

from __future__ import annotations

import math
import time
from statistics import fmean
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

#: The provisional horizon while the step time is being measured, when the recipe gives no ``max_steps``: large, so a
#: cosine schedule stays at its initial rate (its multiplier after 20 of 10⁶ steps is 1 - 10⁻⁹).
PROVISIONAL_HORIZON = 1_000_000


class TimeBudget(Callback):
    """End a run at a wall-clock budget by choosing its step horizon from the measured step time.

    A recipe that fixes ``max_steps`` fixes it from one machine's step time: the same recipe may take 23 minutes on
    one machine and 6 on another. With this callback the recipe states minutes instead. After ``skip_steps`` warm-up
    steps the mean time of the next ``calibration_steps`` outer steps is measured; the horizon is then the step
    count that fills what is left of the budget (counted from the start of ``fit``, so set-up work such as a teacher
    pool counts) times ``margin``. It is set as ``trainer.max_steps`` and as the horizon of every schedule that takes
    its length from the run (cosine decay, APM's halfway decay) through
    :meth:`~lightning_distill.methods.DistillationMethod.set_horizon`, and is logged, recorded in the export
    (``config.horizon``) and checkpointed: a resumed run keeps the horizon and runs to it, however fast the machine
    it resumes on. Under DDP the horizon is rank zero's, broadcast.

    A few steps are a short sample: a run timed while the machine was busier than it was later finishes early (one
    of ours chose 1588 steps at 1 s/step and was done in 19.2 of its 28 minutes). So the horizon is refined once,
    when ``refine_after`` of the budget has passed: from the mean step time since the plan (hundreds of steps, the
    periodic exports and checkpoints among them), before a cosine schedule has moved (its rate is still above 0.97 of
    the initial one at a tenth of its length). The plan records both (``refined``). A run resumed before the
    refinement keeps the first horizon.

    The recipe's ``trainer.max_steps``, when given (> 0), is a cap on the horizon; ``-1`` lets the budget decide
    (the trainer then needs ``max_time``, which also stays the hard stop). Work that comes every N steps (checkpoints,
    exports, evaluation callbacks) is only partly in the measured window: ``margin`` leaves room for it.

    Args:
        minutes: the budget of the whole ``fit``, set-up included.
        calibration_steps: outer steps timed to measure the step time.
        skip_steps: first steps not timed (allocator and kernel warm-up, the first pool or student).
        margin: fraction of the remaining time the chosen horizon is planned to fill.
        refine_after: fraction of the budget after which the horizon is refined once (at least ``calibration_steps``
            steps after the plan); ``None`` keeps the first horizon.
    """

    def __init__(
        self,
        minutes: float,
        calibration_steps: int = 20,
        skip_steps: int = 3,
        margin: float = 0.95,
        refine_after: float | None = 0.1,
    ) -> None:
        if minutes <= 0:
            raise ValueError(f"TimeBudget needs a positive number of minutes, got {minutes}")
        if calibration_steps < 1 or skip_steps < 0:
            raise ValueError(
                f"TimeBudget needs calibration_steps >= 1 and skip_steps >= 0, got {calibration_steps}, {skip_steps}"
            )
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"TimeBudget's margin must be in (0, 1], got {margin}")
        if refine_after is not None and not 0.0 < refine_after < 1.0:
            raise ValueError(f"TimeBudget's refine_after must be in (0, 1) or None, got {refine_after}")
        self.minutes = float(minutes)
        self.calibration_steps = int(calibration_steps)
        self.skip_steps = int(skip_steps)
        self.margin = float(margin)
        self.refine_after = None if refine_after is None else float(refine_after)
        self.plan: dict[str, Any] | None = None  # the chosen horizon, checkpointed
        self._planned_at: tuple[int, float] | None = None  # (step, clock) of this process's plan: refine from there
        self._cap: int | None = None
        self._t0: float | None = None
        self._last: float | None = None
        self._times: list[float] = []

    @property
    def state_key(self) -> str:
        return "TimeBudget"

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._t0 = time.monotonic()  # before the method's set-up (teacher pools, caches): the budget holds them
        cap = trainer.max_steps
        self._cap = cap if cap is not None and cap > 0 else None
        if self._cap is None:
            # The schedules are built next, from trainer.max_steps: give them a horizon until the measured one.
            trainer.fit_loop.epoch_loop.max_steps = PROVISIONAL_HORIZON

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume the checkpoint's plan is loaded by now (and the schedules' states): keep its horizon.
        if self.plan is not None:
            self._apply(trainer, pl_module, resumed=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.monotonic()
        if self.plan is not None:
            # Planned here and not yet refined: refine at the planned step. Resumed with a plan: nothing to time.
            refine_at = self.plan.get("refine_at_step")
            if self._planned_at is not None and refine_at is not None and trainer.global_step >= refine_at:
                self._refine(trainer, pl_module, now)
            return
        if self._last is not None and trainer.global_step > self.skip_steps:
            self._times.append(now - self._last)
        self._last = now
        if len(self._times) >= self.calibration_steps:
            self._choose(trainer, pl_module, now)

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = state_dict.get("plan")

    # ------------------------------------------------------------------------------------------------- plan
    def _horizon(self, step: int, now: float, seconds_per_step: float) -> tuple[int, float]:
        """``(horizon, elapsed seconds)``: the steps filling ``margin`` of what is left of the budget at ``now`` (at
        least one more, at most the recipe's ``max_steps``)."""
        elapsed = now - (self._t0 if self._t0 is not None else now)
        remaining = max(self.minutes * 60.0 - elapsed, 0.0)
        horizon = step + max(int(self.margin * remaining / seconds_per_step), 1)
        return (horizon if self._cap is None else min(horizon, self._cap)), elapsed

    def _capped(self, horizon: int) -> bool:
        """Whether the recipe's ``max_steps``, not the clock, set ``horizon`` (recorded in the plan)."""
        return self._cap is not None and horizon == self._cap

    def _choose(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        step = int(trainer.global_step)
        seconds_per_step = fmean(self._times)
        horizon, elapsed = self._horizon(step, now, seconds_per_step)
        if elapsed >= self.minutes * 60.0:
            rank_zero_warn(
                f"TimeBudget: the {self.minutes:g}-minute budget was spent before the step time was measured "
                f"({elapsed / 60:.1f} min at step {step}); the run ends after one more step. Give more minutes or "
                "fewer calibration_steps."
            )
        # The refinement's step is fixed now, from rank zero's clock like the horizon, so that every rank refines
        # (and broadcasts) at the same step.
        refine_at = None
        if self.refine_after is not None and horizon > step + 1:
            wait = math.ceil(self.refine_after * self.minutes * 60.0 / seconds_per_step)
            refine_at = step + max(wait, self.calibration_steps)
            refine_at = refine_at if refine_at < horizon else None
        horizon, refine_at = trainer.strategy.broadcast((int(horizon), refine_at), src=0)
        self.plan = {
            "minutes": self.minutes,
            "horizon": int(horizon),
            "seconds_per_step": seconds_per_step,
            "measured_steps": [step - len(self._times) + 1, step],  # the first and last step timed
            "elapsed_at_plan_s": elapsed,
            "capped_by_max_steps": self._capped(horizon),
            "refine_at_step": refine_at,
        }
        self._planned_at = (step, now)
        self._apply(trainer, pl_module, resumed=False)

    def _refine(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        plan = self.plan
        assert plan is not None and self._planned_at is not None
        step = int(trainer.global_step)
        plan_step, plan_time = self._planned_at
        seconds_per_step = (now - plan_time) / max(step - plan_step, 1)
        horizon, elapsed = self._horizon(step, now, seconds_per_step)
        horizon = int(trainer.strategy.broadcast(horizon, src=0))
        plan["refined"] = {
            "from_horizon": plan["horizon"],
            "seconds_per_step": seconds_per_step,
            "measured_steps": [plan_step + 1, step],
            "elapsed_s": elapsed,
        }
        plan.update(
            horizon=horizon,
            refine_at_step=None,
            capped_by_max_steps=self._capped(horizon),
        )
        self._planned_at = None
        self._apply(trainer, pl_module, resumed=False)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, resumed: bool) -> None:
        plan = self.plan
        assert plan is not None
        horizon = int(plan["horizon"])
        trainer.fit_loop.epoch_loop.max_steps = horizon
        timed = plan.get("refined") or plan
        source = (
            f"time budget: {plan['minutes']:g} min at {timed['seconds_per_step']:.3g} s/step over steps "
            f"{timed['measured_steps'][0]}-{timed['measured_steps'][1]}"
            + (f" (refined from {plan['refined']['from_horizon']})" if plan.get("refined") else "")
            + (" (capped by max_steps)" if plan.get("capped_by_max_steps") else "")
        )
        if hasattr(pl_module, "set_horizon"):
            pl_module.set_horizon(horizon, source=source)
        what = "kept from the checkpoint" if resumed else ("refined" if plan.get("refined") else "chosen")
        rank_zero_info(f"TimeBudget: horizon {horizon} steps {what} ({source})")
        for logger in trainer.loggers:
            logger.log_metrics({"train/horizon": float(horizon)}, step=trainer.global_step)
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "_count_steps"):
            bar._count_steps(trainer)
