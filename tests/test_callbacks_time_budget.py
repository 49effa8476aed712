"""TimeBudget: the horizon from the measured step time, applied to max_steps and the schedules, kept on resume;
the horizon-aware schedules it drives."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_distill.callbacks.time_budget as time_budget
from lightning_distill.callbacks import ExportDistilled, TimeBudget
from lightning_distill.export import load_distilled
from lightning_distill.methods import FRePo
from lightning_distill.optim import CosineDecay, StepDecay
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm


class FakeClock:
    """``time.monotonic`` of the callback's module: every reading advances by ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.step, self.t = step, 0.0

    def monotonic(self) -> float:
        now = self.t
        self.t += self.step
        return now


class SlowStartClock(FakeClock):
    """Readings advance ``slow`` seconds for the first ``n`` readings, then ``step``: a start-up timed while busy."""

    def __init__(self, slow: float, n: int, step: float) -> None:
        super().__init__(step)
        self.slow, self.n = slow, n

    def monotonic(self) -> float:
        now = self.t
        self.t += self.slow if self.n > 0 else self.step
        self.n -= 1
        return now


def _frepo() -> FRePo:
    return FRePo(synthetic=PixelSet(ipc=1, labels="learned"), arch_kwargs={"width": 4}, pool_size=2)


def _fit(root, tmp_path, method, callbacks, max_steps=-1, ckpt_path=None):
    trainer = quiet_trainer(tmp_path, max_steps, callbacks, max_time="00:01:00:00", enable_checkpointing=True)
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=32), ckpt_path=ckpt_path)
    return trainer


def test_horizon_from_the_measured_step_time(data_root, tmp_path, monkeypatch):
    # One clock reading in setup (t = 0), then one per step: 1 s per step. Steps 2-4 are timed (skip 1, calibrate 3),
    # the plan comes at step 4 (t = 4 s): 26 s are left of 30, so 26 more steps: horizon 30.
    monkeypatch.setattr(time_budget, "time", FakeClock(1.0))
    L.seed_everything(0, verbose=False)
    method = _frepo()
    budget = TimeBudget(minutes=0.5, calibration_steps=3, skip_steps=1, margin=1.0)
    export = ExportDistilled(path=str(tmp_path / "distilled.pt"), png=False, artifact=False)
    trainer = _fit(data_root, tmp_path, method, [budget, export])

    assert trainer.global_step == 30 and trainer.max_steps == 30
    assert budget.plan["horizon"] == 30 and budget.plan["seconds_per_step"] == pytest.approx(1.0)
    assert budget.plan["measured_steps"] == [2, 4] and not budget.plan["capped_by_max_steps"]
    sched = method.lr_schedulers()
    assert isinstance(sched, CosineDecay) and sched.total_steps == 30
    # The rate ends where a 30-step cosine ends: the schedule follows the chosen horizon, not the provisional one.
    assert sched.get_last_lr()[0] == pytest.approx(sched.base_lrs[0] * sched.final_ratio)
    horizon = load_distilled(tmp_path / "distilled.pt")["config"]["horizon"]
    assert horizon["steps"] == 30 and horizon["source"].startswith("time budget: 0.5 min at 1 s/step")


def test_the_horizon_is_refined_once_from_the_steps_since_the_plan(data_root, tmp_path, monkeypatch):
    # Setup at t = 0, steps 1-4 at 2 s (a busy start), then 1 s. Plan at step 4 (t = 8): 2 s/step over steps 2-4,
    # 52 s left of 60: horizon 30. The refinement waits a quarter of the budget at the planned rate (8 steps): at
    # step 12 (t = 16) it measures 1 s/step over steps 5-12, 44 s left: horizon 56, the whole budget used.
    monkeypatch.setattr(time_budget, "time", SlowStartClock(2.0, 4, 1.0))
    L.seed_everything(0, verbose=False)
    method = _frepo()
    budget = TimeBudget(minutes=1, calibration_steps=3, skip_steps=1, margin=1.0, refine_after=0.25)
    export = ExportDistilled(path=str(tmp_path / "distilled.pt"), png=False, artifact=False)
    trainer = _fit(data_root, tmp_path, method, [budget, export])

    assert trainer.global_step == 56 and budget.plan["horizon"] == 56
    refined = budget.plan["refined"]
    assert refined["from_horizon"] == 30 and refined["measured_steps"] == [5, 12]
    assert refined["seconds_per_step"] == pytest.approx(1.0) and budget.plan["seconds_per_step"] == pytest.approx(2.0)
    sched = method.lr_schedulers()
    assert sched.total_steps == 56 and sched.get_last_lr()[0] == pytest.approx(sched.base_lrs[0] * sched.final_ratio)
    horizon = load_distilled(tmp_path / "distilled.pt")["config"]["horizon"]
    assert horizon["steps"] == 56 and "over steps 5-12 (refined from 30)" in horizon["source"]


def test_refine_after_none_keeps_the_first_horizon(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "time", SlowStartClock(2.0, 4, 1.0))
    L.seed_everything(0, verbose=False)
    budget = TimeBudget(minutes=1, calibration_steps=3, skip_steps=1, margin=1.0, refine_after=None)
    trainer = _fit(data_root, tmp_path, _frepo(), [budget])
    assert trainer.global_step == 30 and "refined" not in budget.plan and budget.plan["refine_at_step"] is None


def test_max_steps_caps_the_horizon(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "time", FakeClock(1.0))
    L.seed_everything(0, verbose=False)
    method = _frepo()
    budget = TimeBudget(minutes=0.5, calibration_steps=3, skip_steps=1, margin=1.0)
    trainer = _fit(data_root, tmp_path, method, [budget], max_steps=12)
    assert trainer.global_step == 12 and budget.plan["horizon"] == 12 and budget.plan["capped_by_max_steps"]
    assert method.lr_schedulers().total_steps == 12 and "(capped by max_steps)" in method.horizon["source"]


def test_a_resume_keeps_the_horizon(data_root, tmp_path, monkeypatch):
    class StopAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 15:
                trainer.should_stop = True  # a kill after the step-15 checkpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_last=True)
    monkeypatch.setattr(time_budget, "time", FakeClock(1.0))
    L.seed_everything(0, verbose=False)
    first = TimeBudget(minutes=0.5, calibration_steps=3, skip_steps=1, margin=1.0)
    _fit(data_root, tmp_path, _frepo(), [first, ckpt, StopAt()])
    assert first.plan["horizon"] == 30

    # Resumed on a machine ten times faster: the plan in the checkpoint holds, not a new measurement.
    monkeypatch.setattr(time_budget, "time", FakeClock(0.1))
    method = _frepo()
    second = TimeBudget(minutes=0.5, calibration_steps=3, skip_steps=1, margin=1.0)
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt2")
    trainer = _fit(data_root, tmp_path, method, [second, ckpt2], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 30 and second.plan == first.plan
    assert method.lr_schedulers().total_steps == 30


def test_a_budget_spent_before_the_plan_ends_the_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "time", FakeClock(10.0))  # 10 s per step, 30 s budget: spent by step 4
    L.seed_everything(0, verbose=False)
    budget = TimeBudget(minutes=0.5, calibration_steps=3, skip_steps=1)
    with pytest.warns(UserWarning, match="budget was spent"):
        trainer = _fit(data_root, tmp_path, _frepo(), [budget])
    assert trainer.global_step == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"minutes": 0}, "positive number of minutes"),
        ({"minutes": 1, "calibration_steps": 0}, "calibration_steps"),
        ({"minutes": 1, "margin": 1.5}, "margin"),
        ({"minutes": 1, "refine_after": 1.0}, "refine_after"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeBudget(**kwargs)


# ---------------------------------------------------------------------------------------------------- schedules
def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_decay_matches_multistep_lr():
    ours, theirs = _opt(), _opt()
    decay = StepDecay(ours, total_steps=10, fractions=(0.5, 0.8), gamma=0.3)
    ref = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[5, 8], gamma=0.3)
    for _ in range(12):
        assert decay.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12)
        ours.step(), theirs.step(), decay.step(), ref.step()


def test_step_decay_follows_a_new_horizon():
    decay = StepDecay(_opt(), fractions=(0.5,), gamma=0.3)
    decay.set_horizon(1_000_000)
    for _ in range(6):
        decay.step()
    assert decay.get_last_lr()[0] == 1.0
    decay.set_horizon(10)  # the measured horizon: halfway is step 5, already passed
    decay.step()
    assert decay.get_last_lr()[0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="TimeBudget"):
        decay.set_horizon(-1)
    with pytest.raises(ValueError, match="fractions"):
        StepDecay(_opt(), fractions=(0.0,))
