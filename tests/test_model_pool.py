"""ModelPool: staggered resets, online Adam updates, BN hygiene, checkpoint round trip, seeded re-initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distill.components import ModelPool
from lightning_distill.functional import half_mse


@pytest.fixture(autouse=True)
def _one_thread():
    # Hundreds of tiny steps: with 2 intra-op threads on 2 shared, busy cores each step costs ~60 ms of OpenMP
    # spinning instead of ~0.5 ms.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    """Follows the net contract (logits, or flattened features with features_only=True) and has a BatchNorm."""

    def __init__(self, in_dim: int = 6, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        h = torch.relu(self.bn(self.fc(x.flatten(1))))
        return h if features_only else self.head(h)


def _batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _pool(**kw) -> ModelPool:
    return ModelPool(TinyNet, **{"size": 10, "max_online_steps": 100, "seed": 0, **kw})


def test_pool_is_not_a_module_and_registers_nothing():
    pool = _pool(size=2)
    assert not isinstance(pool, nn.Module)
    holder = nn.Module()
    holder.pool = pool
    assert list(holder.parameters()) == [] and list(holder.buffers()) == []


def test_staggered_initial_counts():
    assert [_pool().step_count(i) for i in range(10)] == [10 * i for i in range(10)]
    assert [_pool(staggered=False).step_count(i) for i in range(10)] == [0] * 10
    assert [ModelPool(TinyNet, size=3, max_online_steps=10).step_count(i) for i in range(3)] == [0, 3, 6]


def test_reset_schedule_is_exact():
    # A member trains while its count is <= max_online_steps and is re-initialised on the next selection, so
    # member i (starting at 10·i) gets 101 − 10·i updates before its first reset and 101 after each later one.
    pool = _pool()
    x, y = _batch()
    for i in range(10):
        updates = 0
        while pool.train_step(i, x, y) is not None:
            updates += 1
        assert updates == 101 - 10 * i, i
        assert pool.step_count(i) == 0 and pool.reset_count(i) == 1
    updates = 0
    while pool.train_step(9, x, y) is not None:
        updates += 1
    assert updates == 101 and pool.reset_count(9) == 2


def test_train_step_updates_params_buffers_and_lowers_loss():
    pool = _pool(size=2, lr=1e-2)
    x, y = _batch()
    before_params = {k: v.clone() for k, v in pool.params(0).items()}
    before_buffers = {k: v.clone() for k, v in pool.buffers(0).items()}
    losses = [pool.train_step(0, x, y).item() for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]
    assert all(not torch.equal(pool.params(0)[k], before_params[k]) for k in before_params)
    assert not torch.equal(pool.buffers(0)["bn.running_mean"], before_buffers["bn.running_mean"])
    assert pool.buffers(0)["bn.num_batches_tracked"].item() == 20
    assert pool.step_count(0) == 20
    # The other member is untouched (staggered start 100·1/2).
    assert pool.step_count(1) == 50 and pool.buffers(1)["bn.num_batches_tracked"].item() == 0


def test_train_step_matches_torch_adam_on_a_module():
    pool = _pool(size=1, lr=1e-2)
    net = TinyNet()
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, eps=1e-8)
    x, y = _batch()
    net.train()
    for _ in range(3):
        opt.zero_grad()
        half_mse(net(x), y).backward()
        opt.step()
        pool.train_step(0, x, y)
    for k, v in net.state_dict().items():
        torch.testing.assert_close({**pool.params(0), **pool.buffers(0)}[k], v, rtol=1e-5, atol=1e-6)
    # Applying the stored tensors through the (meta-device) template equals the real module in eval mode.
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    net.eval()
    torch.testing.assert_close(pool.features(0, x), net(x, features_only=True))
    torch.testing.assert_close(pool.forward(0, x), net(x))


def test_train_step_under_no_grad_and_detaches_inputs():
    pool = _pool(size=1)
    x, y = _batch()
    x.requires_grad_(True)
    with torch.no_grad():
        assert pool.train_step(0, x, y) is not None
    assert x.grad is None


def test_features_leave_buffers_untouched():
    pool = _pool(size=1)
    pool.train_step(0, *_batch())  # non-trivial running statistics
    x = _batch(1)[0].requires_grad_(True)
    before = {k: v.clone() for k, v in pool.buffers(0).items()}
    eval_feats = pool.features(0, x)
    train_feats = pool.features(0, x, train=True)
    for k, v in before.items():
        assert torch.equal(pool.buffers(0)[k], v), k
    assert eval_feats.shape == (16, 8)
    assert not torch.allclose(eval_feats, train_feats)  # batch statistics differ from running ones
    # Features are differentiable w.r.t. the input (the meta-gradient path), not w.r.t. the stored params.
    (grad,) = torch.autograd.grad(eval_feats.sum(), x)
    assert grad.abs().sum() > 0
    assert all(not p.requires_grad for p in pool.params(0).values())
    assert pool.forward(0, x).shape == (16, 3)


def test_state_dict_round_trip(tmp_path):
    pool = _pool(size=3, max_online_steps=4)
    x, y = _batch()
    for _ in range(3):
        for i in range(3):
            pool.train_step(i, x, y)
    path = tmp_path / "pool.pt"
    torch.save(pool.state_dict(), path)
    restored = _pool(size=3, max_online_steps=4, seed=123)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for i in range(3):
        assert torch.equal(restored.features(0, x), pool.features(0, x))
        assert torch.equal(restored.forward(i, x), pool.forward(i, x))
        assert restored.step_count(i) == pool.step_count(i) and restored.reset_count(i) == pool.reset_count(i)
    # Continuing both (Adam state, counters and the re-initialisation seed all restored) stays identical, across
    # the resets that happen within these steps.
    for _ in range(4):
        for i in range(3):
            a, b = pool.train_step(i, x, y), restored.train_step(i, x, y)
            assert (a is None) == (b is None)
    assert sum(pool.reset_count(i) for i in range(3)) > 0
    for i in range(3):
        assert torch.equal(restored.forward(i, x), pool.forward(i, x))


def test_load_state_dict_rejects_other_pools():
    with pytest.raises(ValueError):
        _pool(size=2).load_state_dict(_pool(size=3).state_dict())


def test_seeded_reinit_reproducible_and_global_rng_untouched():
    rng_before = torch.get_rng_state()
    a, b, c = _pool(size=3, max_online_steps=0), _pool(size=3, max_online_steps=0), _pool(size=3, seed=1)
    for k in a.params(0):
        assert torch.equal(a.params(0)[k], b.params(0)[k])
    assert not torch.equal(a.params(0)["fc.weight"], c.params(0)["fc.weight"])
    # Members differ from each other.
    assert not torch.equal(a.params(0)["fc.weight"], a.params(1)["fc.weight"])
    x, y = _batch()
    first = {k: v.clone() for k, v in a.params(1).items()}
    for pool in (a, b):
        pool.train_step(1, x, y)  # count 0 -> 1 (one update)
        assert pool.train_step(1, x, y) is None  # 1 > 0: re-initialised
    assert a.reset_count(1) == 1
    for k in first:
        assert torch.equal(a.params(1)[k], b.params(1)[k])
    assert not torch.equal(a.params(1)["fc.weight"], first["fc.weight"])
    # A reset re-creates Adam state and counters too.
    assert a.step_count(1) == 0
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_select_uniform_and_seeded():
    pool = _pool()
    draws = [pool.select(torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([pool.select(g) for _ in range(500)]), minlength=10)
    assert counts.min() > 20


def test_to_device_returns_pool():
    pool = _pool(size=2)
    assert pool.to("cpu") is pool and pool.device == torch.device("cpu")
    assert all(v.device.type == "cpu" for v in pool.params(1).values())
