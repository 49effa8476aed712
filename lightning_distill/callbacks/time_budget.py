"""A wall-clock budget for a distillation run: the step horizon chosen from the step time measured on this machine."""

from __future__ import annotations

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
    pool counts) times ``margin``. It is set once, as ``trainer.max_steps`` and as the horizon of every schedule that
    takes its length from the run (cosine decay, APM's halfway decay) through
    :meth:`~lightning_distill.methods.DistillationMethod.set_horizon`, and is logged, recorded in the export
    (``config.horizon``) and checkpointed: a resumed run keeps the horizon and runs to it, however fast the machine
    it resumes on. Under DDP the horizon is rank zero's, broadcast.

    The recipe's ``trainer.max_steps``, when given (> 0), is a cap on the horizon; ``-1`` lets the budget decide
    (the trainer then needs ``max_time``, which also stays the hard stop). Work that comes every N steps (checkpoints,
    exports, evaluation callbacks) is only partly in the measured window: ``margin`` leaves room for it.

    Args:
        minutes: the budget of the whole ``fit``, set-up included.
        calibration_steps: outer steps timed to measure the step time.
        skip_steps: first steps not timed (allocator and kernel warm-up, the first pool or student).
        margin: fraction of the remaining time the chosen horizon is planned to fill.
    """

    def __init__(self, minutes: float, calibration_steps: int = 20, skip_steps: int = 3, margin: float = 0.95) -> None:
        if minutes <= 0:
            raise ValueError(f"TimeBudget needs a positive number of minutes, got {minutes}")
        if calibration_steps < 1 or skip_steps < 0:
            raise ValueError(
                f"TimeBudget needs calibration_steps >= 1 and skip_steps >= 0, got {calibration_steps}, {skip_steps}"
            )
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"TimeBudget's margin must be in (0, 1], got {margin}")
        self.minutes = float(minutes)
        self.calibration_steps = int(calibration_steps)
        self.skip_steps = int(skip_steps)
        self.margin = float(margin)
        self.plan: dict[str, Any] | None = None  # the chosen horizon, checkpointed
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
        if self.plan is not None:
            return  # planned (or resumed with a plan): nothing more to time
        now = time.monotonic()
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
    def _choose(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> None:
        step = int(trainer.global_step)
        seconds_per_step = fmean(self._times)
        elapsed = now - (self._t0 if self._t0 is not None else now)
        remaining = self.minutes * 60.0 - elapsed
        planned = int(self.margin * max(remaining, 0.0) / seconds_per_step)
        horizon = step + max(planned, 1)
        if remaining <= 0:
            rank_zero_warn(
                f"TimeBudget: the {self.minutes:g}-minute budget was spent before the step time was measured "
                f"({elapsed / 60:.1f} min at step {step}); the run ends after one more step. Give more minutes or "
                "fewer calibration_steps."
            )
        if self._cap is not None:
            horizon = min(horizon, self._cap)
        horizon = int(trainer.strategy.broadcast(horizon, src=0))  # every rank stops at the same step
        self.plan = {
            "minutes": self.minutes,
            "horizon": horizon,
            "seconds_per_step": seconds_per_step,
            "measured_steps": [step - len(self._times) + 1, step],  # the first and last step timed
            "elapsed_at_plan_s": elapsed,
            "capped_by_max_steps": self._cap is not None and horizon == self._cap,
        }
        self._apply(trainer, pl_module, resumed=False)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, resumed: bool) -> None:
        plan = self.plan
        assert plan is not None
        horizon = int(plan["horizon"])
        trainer.fit_loop.epoch_loop.max_steps = horizon
        source = (
            f"time budget: {plan['minutes']:g} min at {plan['seconds_per_step']:.3g} s/step over steps "
            f"{plan['measured_steps'][0]}-{plan['measured_steps'][1]}"
            + (" (capped by max_steps)" if plan.get("capped_by_max_steps") else "")
        )
        if hasattr(pl_module, "set_horizon"):
            pl_module.set_horizon(horizon, source=source)
        what = "kept from the checkpoint" if resumed else "chosen"
        rank_zero_info(f"TimeBudget: horizon {horizon} steps {what} ({source})")
        for logger in trainer.loggers:
            logger.log_metrics({"train/horizon": float(horizon)}, step=trainer.global_step)
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "_count_steps"):
            bar._count_steps(trainer)
