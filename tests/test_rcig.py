"""RCIG as a method: pool schedule, learning-rate tuning and adaptation, EMA view, subsampling, non-finite steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill.components import ParameterEMA
from lightning_distill.functional.rcig import SolverSettings
from lightning_distill.methods import RCIG
from lightning_distill.methods.rcig import tune_lr
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm

SMALL = {"arch_kwargs": {"width": 8, "depth": 2}, "inner_steps": 3, "hinv_steps": 3}


def _rcig(**kwargs) -> RCIG:
    options = {**SMALL, "pool_size": 3, "tune_lr": False, "inner_lr": 1e-2, "hinv_lr": 1.0, **kwargs}
    return RCIG(synthetic=kwargs.pop("synthetic", None) or PixelSet(ipc=1, labels="learned"), **options)


class _Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        m = pl_module
        if m.pool is not None:
            self.before = (m.pool_index, m.pool.step_count(m.pool_index), m.pool.reset_count(m.pool_index))

    def on_train_batch_end(self, trainer, pl_module, *args):
        m = pl_module
        idx, steps, resets = self.before
        self.rows.append((idx, steps, resets, m.pool.step_count(idx), m.pool.reset_count(idx)))
        self.live = m.synthetic.images.detach().clone()
        self.lives = [*getattr(self, "lives", []), self.live]


def _fit(method, root, tmp_path, steps, callbacks=(), **kwargs):
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(tmp_path, steps, list(callbacks), **kwargs)
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=32))
    return trainer


def test_pool_takes_1_to_k_steps_per_visit_without_stagger_and_resets_after_its_limit(data_root, tmp_path):
    method = _rcig(pool_size=1, max_online_steps=5, pool_steps=(1, 3))
    record = _Record()
    _fit(method, data_root, tmp_path, 8, [record])
    assert record.rows[0][1] == 0  # no stagger: the pool starts fresh
    drawn = set()
    for _, steps, resets, steps_after, resets_after in record.rows:
        if steps >= 5:
            # A model that has done its 5 steps is re-initialised at its next visit and not trained then.
            assert (steps_after, resets_after) == (0, resets + 1)
        else:
            assert resets_after == resets and 1 <= steps_after - steps <= 3
            drawn.add(steps_after - steps)
    assert any(r[4] > r[2] for r in record.rows), "the model was never re-initialised"
    assert len(drawn) > 1, "the steps per visit were not drawn"


def test_tune_lr_grows_while_monotone_then_backs_off():
    calls = []

    def run(lr):
        calls.append(lr)
        return lr < 1e-3

    lr, runs = tune_lr(run, 1e-4)
    assert calls[0] == 1e-4 and all(b == pytest.approx(a * 1.2) for a, b in zip(calls, calls[1:], strict=False))
    assert calls[-1] >= 1e-3 > calls[-2]
    assert lr == pytest.approx(calls[-1] * 0.7) and runs == len(calls)


def test_tuning_picks_rates_just_below_the_first_non_monotone_one_and_is_checkpointed(data_root, tmp_path):
    from lightning_distill.functional.rcig import inner_system, support_set

    method = _rcig()
    trainer = _fit(method, data_root, tmp_path, 1)
    dm = trainer.datamodule
    x_syn, y_syn = method.synthetic()
    x_real, y_real = dm.x_train[:32], dm.y_train[:32]
    method.inner_lr, method.hinv_lr, method.tuned = 1e-3, 1e-2, False
    report = method.tune(x_syn, y_syn, x_real, y_real)
    assert method.tuned and report["inner_lr"] == method.inner_lr and report["hinv_lr"] == method.hinv_lr
    net, params, buffers = method._network()
    x_sup, y_sup = support_set(x_syn.detach(), method.targets(y_syn.detach()), False)
    system = inner_system(net, params, buffers, x_sup, y_sup, method.ridge())

    def monotone(lr):
        return SolverSettings("adam", method.inner_steps, lr).solve(system, system.b).monotone

    # tuned = 0.7 x the first rate that was not monotone; the one before it (tuned / 0.7 / 1.2) was.
    assert not monotone(method.inner_lr / 0.7)
    assert monotone(method.inner_lr / 0.7 / 1.2)
    ckpt = tmp_path / "tuned.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = RCIG.load_from_checkpoint(ckpt, synthetic=PixelSet(ipc=1, labels="learned"), weights_only=False)
    assert loaded.tuned and loaded.inner_lr == method.inner_lr and loaded.hinv_lr == method.hinv_lr


def test_inner_rate_adaptation_follows_the_run_statistics():
    method = _rcig()
    method._runs, method._runs_increased, method._runs_monotone = 10, 3, 0
    method._adapt()
    assert method.inner_lr == pytest.approx(1e-2 * 0.9)
    method._runs, method._runs_increased, method._runs_monotone = 10, 0, 7
    method._adapt()
    assert method.inner_lr == pytest.approx(1e-2 * 0.9 * 1.05)
    method._runs, method._runs_increased, method._runs_monotone = 10, 2, 6
    method._adapt()
    assert method.inner_lr == pytest.approx(1e-2 * 0.9 * 1.05)
    assert method._runs == 0


def test_parameter_ema_is_the_bias_corrected_average():
    ema = ParameterEMA(0.9)
    xs = [torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-2.0])]
    for t, x in enumerate(xs, start=1):
        ema.update({"a": x})
        weights = [0.1 * 0.9 ** (t - i) for i in range(1, t + 1)]
        expected = sum(w * v for w, v in zip(weights, xs[:t], strict=True)) / (1 - 0.9**t)
        torch.testing.assert_close(ema.values["a"], expected)


def test_export_and_evaluation_see_the_ema_of_the_set(data_root, tmp_path):
    from lightning_distill.callbacks import ExportDistilled
    from lightning_distill.export import load_distilled

    method = _rcig(ema_decay=0.5)
    record = _Record()
    _fit(method, data_root, tmp_path, 3, [record, ExportDistilled()])
    expected = ParameterEMA(0.5)
    for live in record.lives:
        expected.update({"x": live})
    view = method.distilled_view()
    assert view.source == "average"
    torch.testing.assert_close(view.images, expected.values["x"])
    assert not torch.equal(view.images, method.synthetic.images)  # the live set is left as it is
    torch.testing.assert_close(load_distilled(tmp_path / "distilled.pt")["images"], view.images)
    plain = _rcig(ema_decay=0.0)
    _fit(plain, data_root, tmp_path / "plain", 1)
    assert plain.distilled_view().source == "live"


def test_subsampled_direct_pass_only_differentiates_the_drawn_images():
    from lightning_distill.functional.rcig import meta_gradient
    from lightning_distill.nets import get_net

    torch.manual_seed(0)
    net = get_net("convnet_rcig", 1, 4, 8, width=3, depth=2).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x_syn = torch.randn(8, 1, 8, 8, requires_grad=True)
    y_syn = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float() - 0.25
    x_real, y_real = torch.randn(16, 1, 8, 8), torch.arange(16) % 4
    s = SolverSettings("cg", steps=50, tol=1e-8)
    tau = torch.zeros((), requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    mg = meta_gradient(net, params, {}, x_syn, y_syn, x_real, y_real, tau, 1e-3, s, s, syn_grad_batch=3, generator=gen)
    rows = (mg.direct["x_syn"].flatten(1).abs().sum(1) > 0).sum()
    assert int(rows) == 3
    full = meta_gradient(net, params, {}, x_syn, y_syn, x_real, y_real, tau, 1e-3, s, s)
    assert int((full.direct["x_syn"].flatten(1).abs().sum(1) > 0).sum()) == 8


def test_a_non_finite_set_is_skipped_not_learned(data_root, tmp_path):
    method = _rcig(max_consecutive_skips=0)
    original = method.outer_loss

    def poisoned(x_syn, y_syn, x_real, y_real):
        return original(x_syn * float("nan"), y_syn, x_real, y_real)

    method.outer_loss = poisoned
    _fit(method, data_root, tmp_path, 2)
    assert method.skipped_steps == 2
    assert torch.isfinite(method.synthetic.images).all()


@pytest.mark.parametrize("bad", [{"inner_solver": "lbfgs"}, {"l2_rate": 0.0}, {"ema_decay": 1.0}, {"pool_size": 0}])
def test_bad_settings_are_refused_with_what_to_do(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _rcig(**bad)
