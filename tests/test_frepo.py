"""FRePo: the outer step against closed forms and finite differences; flip trick; pool schedule; NaN safety."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.functional import centred_one_hot, krr_predict
from lightning_distill.methods import FRePo
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm


class _FakePool:
    """Fixed float64 feature maps tanh(x W_idx) standing in for the pool's networks, one per member."""

    def __init__(self, ws):
        self.ws = ws

    def features(self, idx, x, train=False):
        return torch.tanh(x.flatten(1) @ self.ws[idx])


def _method(labels="learned", use_flip=False, k=3, ipc=2, shape=(1, 4, 4)):
    m = FRePo(synthetic=PixelSet(ipc=ipc, num_classes=k, image_shape=shape, labels=labels), use_flip=use_flip)
    m.synthetic.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.synthetic.images.copy_(torch.randn(m.synthetic.images.shape, generator=gen, dtype=torch.float64))
    d = shape[0] * shape[1] * shape[2]
    m.pool = _FakePool([torch.randn(d, 12, generator=gen, dtype=torch.float64) / d**0.5])  # member 0 only
    x_real = torch.randn(20, *shape, generator=gen, dtype=torch.float64)
    y_real = torch.randint(0, k, (20,), generator=gen)
    return m, x_real, y_real


def test_outer_loss_equals_the_closed_form():
    m, x_real, y_real = _method(labels="soft")
    x_syn, y_syn = m.synthetic()
    loss = m.outer_loss(x_syn, y_syn, x_real, y_real).loss
    fs, ft = m.pool.features(0, x_syn), m.pool.features(0, x_real)
    k_ss = fs @ fs.T
    lam = 1e-6 * torch.trace(k_ss) / len(fs)
    pred = ft @ fs.T @ torch.linalg.solve(k_ss + lam * torch.eye(len(fs), dtype=fs.dtype), y_syn)
    expected = 0.5 * (pred - centred_one_hot(y_real, 3, dtype=torch.float64)).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("use_flip", [False, True])
def test_meta_gradient_matches_finite_differences(use_flip):
    m, x_real, y_real = _method(labels="learned", use_flip=use_flip)

    def f(images, labels):
        return m.outer_loss(images, labels, x_real, y_real).loss

    x0, y0 = (t.detach().clone().requires_grad_() for t in m.synthetic())
    assert torch.autograd.gradcheck(f, (x0, y0), eps=1e-6, atol=1e-5)


def test_flip_trick_doubles_the_support_set(monkeypatch):
    m, x_real, y_real = _method(labels="hard", use_flip=True)
    seen = {}

    def spy(feat_s, y_s, feat_t, **kw):
        seen["m"], seen["y"] = len(feat_s), y_s
        return krr_predict(feat_s, y_s, feat_t, **kw)

    monkeypatch.setattr("lightning_distill.methods.frepo.krr_predict", spy)
    x_syn, y_syn = m.synthetic()
    m.outer_loss(x_syn, y_syn, x_real, y_real)
    assert seen["m"] == 12 and torch.equal(seen["y"][:6], seen["y"][6:])
    # hard labels regress their centred one-hot
    torch.testing.assert_close(seen["y"][0], torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float32))


def test_label_margin_only_with_learned_labels():
    for labels, has_margin in [("learned", True), ("soft", False), ("hard", False)]:
        m, x_real, y_real = _method(labels=labels)
        logs = m.outer_loss(*m.synthetic(), x_real, y_real).logs
        assert ("train/label_margin" in logs) == has_margin


def _members(labels, members, k=3, shape=(1, 4, 4)):
    """A FRePo drawing ``len(members)`` pool members a step, on three fake members, with ``members`` drawn."""
    m, x_real, y_real = _method(labels=labels, k=k, shape=shape)
    gen = torch.Generator().manual_seed(1)
    d = shape[0] * shape[1] * shape[2]
    m.pool = _FakePool([torch.randn(d, 12, generator=gen, dtype=torch.float64) / d**0.5 for _ in range(3)])
    m.members_per_step, m.pool_members = len(members), list(members)
    return m, x_real, y_real


@pytest.mark.parametrize("labels", ["soft", "learned"])
def test_several_members_average_the_members_regression_losses(labels):
    """Two members: the mean of each member's own one-member loss, the label-margin term counted once."""
    singles = []
    for idx in (2, 0):
        m, x_real, y_real = _members(labels, [idx])
        x_syn, y_syn = m.synthetic()
        singles.append(m.outer_loss(x_syn, y_syn, x_real, y_real))
    m, x_real, y_real = _members(labels, [2, 0])
    both = m.outer_loss(x_syn, y_syn, x_real, y_real)
    krr = [s.logs["train/krr_loss"] for s in singles]
    torch.testing.assert_close(both.logs["train/krr_loss"], (krr[0] + krr[1]) / 2)
    margin = singles[0].loss - krr[0]  # zero unless labels are learned
    assert (margin != 0) == (labels == "learned")
    torch.testing.assert_close(both.loss, (krr[0] + krr[1]) / 2 + margin)
    acc = [s.logs["train/krr_acc"] for s in singles]
    torch.testing.assert_close(both.logs["train/krr_acc"], (acc[0] + acc[1]) / 2)


def test_several_members_meta_gradient_matches_finite_differences():
    m, x_real, y_real = _members("learned", [1, 2])

    def f(images, labels):
        return m.outer_loss(images, labels, x_real, y_real).loss

    x0, y0 = (t.detach().clone().requires_grad_() for t in m.synthetic())
    assert torch.autograd.gradcheck(f, (x0, y0), eps=1e-6, atol=1e-5)


def _set_up(members_per_step, seed=0):
    m = FRePo(
        synthetic=PixelSet(ipc=1, num_classes=3, image_shape=(1, 8, 8)), arch_kwargs={"width": 4}, pool_size=3,
        members_per_step=members_per_step, seed=seed,
    )  # fmt: skip
    m.setup_method(None)  # builds the pool and draws the first members (it needs no data)
    return m


def test_members_per_step_checkpoint_round_trip_and_mismatch():
    m = _set_up(2)
    m.pool_members = [2, 0]
    state = m.method_state_dict()
    assert state["pool_members"] == [2, 0]
    restored = _set_up(2, seed=1)
    restored.load_method_state_dict(state)
    assert restored.pool_members == [2, 0]
    # A checkpoint from before members_per_step (one "pool_index") resumes a one-member FRePo ...
    legacy = {k: v for k, v in state.items() if k != "pool_members"} | {"pool_index": 1}
    one = _set_up(1)
    one.load_method_state_dict(legacy)
    assert one.pool_members == [1]
    # ... and a member count that differs from the checkpoint's says which to pass.
    with pytest.raises(ValueError, match="drew 1 pool member.* and this one 2: resume with .*members_per_step=1"):
        _set_up(2).load_method_state_dict(legacy)


def _trainer(tmp_path, steps):
    return quiet_trainer(tmp_path, steps)


def test_pool_steps_and_resets_during_training(data_root, tmp_path):
    m = FRePo(synthetic=PixelSet(ipc=1, labels="learned"), arch_kwargs={"width": 4}, pool_size=2, max_online_steps=3)
    _trainer(tmp_path, 12).fit(m, datamodule=tiny_mnist_dm(data_root, batch_size=32))
    # 12 outer steps = 12 online calls. A model trains at counts 0..3 (FRePo resets once the count is *above* the
    # limit), then one call re-initialises it: 5 calls a cycle. Model 1 starts at count 1 (staggered by 3 // 2).
    total_calls = sum(m.pool.step_count(i) + 5 * m.pool.reset_count(i) for i in range(2)) - 1
    assert total_calls == 12
    assert sum(m.pool.reset_count(i) for i in range(2)) >= 1
    assert m.skipped_steps == 0


def test_every_member_drawn_takes_its_online_step(data_root, tmp_path):
    m = FRePo(
        synthetic=PixelSet(ipc=1, labels="learned"), arch_kwargs={"width": 4}, pool_size=2, members_per_step=2,
        max_online_steps=3,
    )  # fmt: skip
    _trainer(tmp_path, 12).fit(m, datamodule=tiny_mnist_dm(data_root, batch_size=32))
    # Both members are drawn every step: 24 online calls, counted as in the test above (model 1 starts at count 1).
    total_calls = sum(m.pool.step_count(i) + 5 * m.pool.reset_count(i) for i in range(2)) - 1
    assert total_calls == 24
    assert sorted(m.pool_members) == [0, 1]
    assert m.skipped_steps == 0


def test_nan_never_reaches_the_synthetic_set(data_root, tmp_path):
    m = FRePo(synthetic=PixelSet(ipc=1, labels="learned"), arch_kwargs={"width": 4}, pool_size=2)
    dm = tiny_mnist_dm(data_root, batch_size=32)
    _trainer(tmp_path, 1).fit(m, datamodule=dm)
    with torch.no_grad():
        m.synthetic.images[0, 0, 0, 0] = float("nan")
    step = m.outer_loss(*m.synthetic(), dm.x_train[:32], dm.y_train[:32])
    assert not torch.isfinite(step.loss)
    before = [p.detach().clone() for p in m.synthetic.parameters()]
    m.apply_meta_step(step)  # the base class's update path
    assert m.skipped_steps == 1
    for p, b in zip(m.synthetic.parameters(), before, strict=True):
        assert torch.equal(p.detach().nan_to_num(), b.nan_to_num())


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool_size"):
        FRePo(synthetic=PixelSet(ipc=1), pool_size=0)
    with pytest.raises(ValueError, match="ridge"):
        FRePo(synthetic=PixelSet(ipc=1), ridge=-1.0)
    with pytest.raises(ValueError, match=r"members_per_step must be between 1 and pool_size \(2\), got 3"):
        FRePo(synthetic=PixelSet(ipc=1), pool_size=2, members_per_step=3)

    with pytest.raises(ValueError, match="group_options names groups this method does not have: temperature"):
        FRePo(
            synthetic=PixelSet(ipc=1, num_classes=3, image_shape=(1, 4, 4)), group_options={"temperature": {}}
        ).optimizer_groups()


def test_default_optimizer_and_schedule_are_the_papers():
    """LAMB at 3e-4 decayed by a cosine to 3e-5 over max_steps: the numbers of the string switch it replaced."""
    import math

    from lightning_distill.optim import LAMB, CosineDecay

    m = FRePo(synthetic=PixelSet(ipc=1, num_classes=3, image_shape=(1, 4, 4), labels="learned"))
    groups = m.optimizer_groups()
    assert [g["name"] for g in groups] == ["images", "labels"]
    opt = m.default_optimizer(groups)
    sched = m.default_scheduler(opt)
    assert isinstance(opt, LAMB) and isinstance(sched, CosineDecay)
    sched.set_horizon(100)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t in (0, 37, 100):
        assert lrs[t] == 3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 100)))
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
