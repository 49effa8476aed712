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
    # Pins the meaning of the default online update: exactly torch.optim.Adam (single-tensor path) on ½-MSE with
    # BN in train mode, bit for bit, and the returned loss is the one before each step.
    pool = _pool(size=1, lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    net = TinyNet()
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7, foreach=False)
    x, y = _batch()
    net.train()
    for _ in range(5):
        opt.zero_grad()
        loss = half_mse(net(x), y)
        loss.backward()
        opt.step()
        assert torch.equal(pool.train_step(0, x, y), loss.detach())
    for k, v in net.state_dict().items():
        assert torch.equal({**pool.params(0), **pool.buffers(0)}[k], v), k
    assert isinstance(pool.optimizer(0), torch.optim.Adam)
    assert all(s["step"].item() == 5 for s in pool.optimizer(0).state.values())
    # Applying the stored tensors through the (meta-device) template equals the real module in eval mode.
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    net.eval()
    torch.testing.assert_close(pool.features(0, x), net(x, features_only=True))
    torch.testing.assert_close(pool.forward(0, x), net(x))


def _signal(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "fc.bias"}


def test_fused_adam_follows_the_compute_device_and_agrees_with_the_single_tensor_path():
    # On the CPU the default stays the single-tensor path (the test above pins it bit for bit); fused=True runs
    # Adam's fused kernel (CUDA's default), which must make the same updates up to float32 rounding. TinyNet's
    # fc.bias feeds a BatchNorm, so its true gradient is zero and what autograd returns is rounding noise (1e-9),
    # which Adam scales to full-size steps of either sign: it is left out of the comparisons.
    x, y = _batch()
    single, fused = _pool(size=1, lr=1e-2), _pool(size=1, lr=1e-2, fused=True)
    assert not single.uses_fused_adam and not single.optimizer(0).defaults["fused"]
    assert fused.uses_fused_adam and fused.optimizer(0).defaults["fused"]
    for _ in range(5):
        single.train_step(0, x, y)
        fused.train_step(0, x, y)
    for k, v in _signal(single.params(0)).items():
        torch.testing.assert_close(fused.params(0)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # Switching the kernel (as to("cuda") does for the default) rebuilds the optimisers with their state: the
    # moments and step count carry over, so the next updates continue the same trajectory.
    single.fused = True
    assert single.optimizer(0).defaults["fused"]
    assert all(s["step"].item() == 5 for s in single.optimizer(0).state.values())
    for _ in range(3):
        single.train_step(0, x, y)
        fused.train_step(0, x, y)
    for k, v in _signal(single.params(0)).items():
        torch.testing.assert_close(fused.params(0)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # A custom factory is never rebuilt: its optimiser is the user's.
    custom = _pool(size=1, optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1))
    opt = custom.optimizer(0)
    custom.fused = True
    assert custom.optimizer(0) is opt


def test_fused_adam_state_round_trips_with_the_single_tensor_path():
    # A checkpoint written on one kernel (a GPU run) resumes on the other (the CPU) and the other way round.
    x, y = _batch()
    fused = _pool(size=2, fused=True)
    for _ in range(3):
        fused.train_step(0, x, y)
    single = _pool(size=2)
    single.load_state_dict(fused.state_dict())
    assert not single.optimizer(0).defaults["fused"]
    back = _pool(size=2, fused=True)
    back.load_state_dict(single.state_dict())
    fused.train_step(0, x, y)
    single.train_step(0, x, y)
    back.train_step(0, x, y)
    for k, v in _signal(fused.params(0)).items():
        torch.testing.assert_close(single.params(0)[k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(back.params(0)[k], v, rtol=1e-5, atol=1e-6, msg=k)


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


def test_select_many_draws_distinct_members_and_one_as_select_does():
    pool = _pool()
    one = [pool.select(torch.Generator().manual_seed(3))]
    assert pool.select_many(torch.Generator().manual_seed(3), 1) == one  # same seed, same member sequence
    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 10):
        draw = pool.select_many(g, k)
        assert len(draw) == k and len(set(draw)) == k and all(0 <= i < 10 for i in draw)
    twice = [pool.select_many(torch.Generator().manual_seed(7), 4) for _ in range(2)]
    assert twice[0] == twice[1]
    for bad in (0, 11):
        with pytest.raises(ValueError, match="distinct members from a pool of 10"):
            pool.select_many(g, bad)


def test_to_device_returns_pool():
    pool = _pool(size=2)
    assert pool.to("cpu") is pool and pool.device == torch.device("cpu")
    assert all(v.device.type == "cpu" for v in pool.params(1).values())


# ---------------------------------------------------------------------------------------------- the general pool


def _same_members(a: ModelPool, b: ModelPool) -> None:
    for i in range(a.size):
        for k, v in {**a.params(i), **a.buffers(i)}.items():
            assert torch.equal(v, {**b.params(i), **b.buffers(i)}[k]), (i, k)
        assert a.step_count(i) == b.step_count(i) and a.reset_count(i) == b.reset_count(i)


def test_steps_per_visit_range_draws_from_the_callers_generator():
    kw = {"size": 2, "max_online_steps": 1000, "staggered": False}
    ranged, single = _pool(steps_per_visit=(1, 4), **kw), _pool(**kw)
    x, y = _batch()
    g, replay = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = []
    for visit in range(8):
        idx = visit % 2
        n = int(torch.randint(1, 5, (1,), generator=replay).item())
        drawn.append(n)
        loss = ranged.train_step(idx, x, y, generator=g)
        # A visit of n steps is n one-step visits (no reset in between).
        for _ in range(n):
            last = single.train_step(idx, x, y)
        assert torch.equal(loss, last)  # the loss of the visit's last step
    assert torch.equal(g.get_state(), replay.get_state())
    assert len(set(drawn)) > 1 and set(drawn) <= {1, 2, 3, 4}
    _same_members(ranged, single)
    for idx in range(2):
        total = sum(drawn[idx::2])
        assert ranged.step_count(idx) == total
        assert all(s["step"].item() == total for s in ranged.optimizer(idx).state.values())


def test_fixed_steps_per_visit_and_range_validation():
    pool = _pool(size=1, steps_per_visit=3, staggered=False)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    pool.train_step(0, *_batch(), generator=g)
    assert pool.step_count(0) == 3
    assert torch.equal(g.get_state(), state)  # a fixed count consumes no randomness
    with pytest.raises(ValueError, match="generator"):
        _pool(size=1, steps_per_visit=(1, 15)).train_step(0, *_batch())
    for bad in (0, (0, 3), (4, 2), (1, 2, 3)):
        with pytest.raises(ValueError):
            _pool(size=1, steps_per_visit=bad)
    # A reset visit draws nothing and trains nothing.
    pool = _pool(size=1, max_online_steps=0, steps_per_visit=(2, 5), staggered=False)
    pool.train_step(0, *_batch(), generator=g)
    state = g.get_state()
    assert pool.train_step(0, *_batch(), generator=g) is None
    assert torch.equal(g.get_state(), state) and pool.step_count(0) == 0


def test_injected_loss_is_used():
    def l1(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).abs().mean()

    pool = _pool(size=1, loss_fn=l1, lr=1e-2)
    net = TinyNet()
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, foreach=False)
    x, y = _batch()
    net.train()
    for _ in range(3):
        opt.zero_grad()
        loss = l1(net(x), y)
        loss.backward()
        opt.step()
        assert torch.equal(pool.train_step(0, x, y), loss.detach())
    for k, v in net.state_dict().items():
        assert torch.equal({**pool.params(0), **pool.buffers(0)}[k], v), k


def test_injected_optimizer_is_used_and_rebuilt_on_reset():
    def sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    pool = _pool(size=1, max_online_steps=2, staggered=False, optimizer_factory=sgd)
    net = TinyNet()
    net.load_state_dict({**pool.params(0), **pool.buffers(0)})
    opt = sgd(list(net.parameters()))
    x, y = _batch()
    net.train()
    for _ in range(3):
        opt.zero_grad()
        half_mse(net(x), y).backward()
        opt.step()
        pool.train_step(0, x, y)
    assert isinstance(pool.optimizer(0), torch.optim.SGD)
    for k, v in net.state_dict().items():
        assert torch.equal({**pool.params(0), **pool.buffers(0)}[k], v), k
    first = pool.optimizer(0)
    assert pool.train_step(0, x, y) is None  # 3 > 2: re-initialised with a fresh optimiser over the new tensors
    assert isinstance(pool.optimizer(0), torch.optim.SGD) and pool.optimizer(0) is not first
    assert not pool.optimizer(0).state
    assert list(map(id, pool.optimizer(0).param_groups[0]["params"])) == list(map(id, pool.params(0).values()))


def test_parked_pool_stores_on_the_park_device_and_matches_unparked():
    kw = {"size": 3, "max_online_steps": 4, "steps_per_visit": (1, 3)}
    parked, plain = _pool(park_device="cpu", **kw), _pool(**kw)
    assert parked.park_device == torch.device("cpu") and plain.park_device is None
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x, y = _batch()
    for visit in range(12):
        a, b = parked.train_step(visit % 3, x, y, generator=g1), plain.train_step(visit % 3, x, y, generator=g2)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        assert torch.equal(parked.features(visit % 3, x), plain.features(visit % 3, x))
    _same_members(parked, plain)
    for i in range(3):
        assert all(v.device == parked.park_device for v in {**parked.params(i), **parked.buffers(i)}.values())
        for s in parked.optimizer(i).state.values():
            assert all(v.device == parked.park_device for v in s.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parked_on_cpu_computes_on_cuda_like_an_unparked_cuda_pool():
    kw = {"size": 3, "max_online_steps": 4, "steps_per_visit": (1, 3), "device": "cuda"}
    parked, plain = _pool(park_device="cpu", **kw), _pool(**kw)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x, y = (t.cuda() for t in _batch())
    for visit in range(12):
        i = visit % 3
        feats = parked.features(i, x.clone().requires_grad_(True))
        assert feats.device.type == "cuda" and torch.equal(feats, plain.features(i, x))
        a, b = parked.train_step(i, x, y, generator=g1), plain.train_step(i, x, y, generator=g2)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for i in range(3):
        for k, v in {**parked.params(i), **parked.buffers(i)}.items():
            assert v.device.type == "cpu" and torch.equal(v, {**plain.params(i), **plain.buffers(i)}[k].cpu()), k
        # The optimiser still holds the stored tensors themselves (moved through .data, never replaced).
        assert list(map(id, parked.optimizer(i).param_groups[0]["params"])) == list(map(id, parked.params(i).values()))
        for s in parked.optimizer(i).state.values():
            assert all(v.device.type == "cpu" for v in s.values())
    # to() changes the compute device only; the members stay parked.
    assert parked.to("cuda").device.type == "cuda" and parked.params(0)["fc.weight"].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_adam_turns_fused_on_cuda_and_back():
    # FRePo builds its pool on the CPU and moves it: the default Adam must follow to the fused kernel, state kept.
    x, y = _batch()
    pool, twin = _pool(size=1, lr=1e-2), _pool(size=1, lr=1e-2)
    for _ in range(3):
        pool.train_step(0, x, y)
        twin.train_step(0, x, y)
    pool.to("cuda")
    assert pool.uses_fused_adam and pool.optimizer(0).defaults["fused"]
    assert all(s["step"].item() == 3 for s in pool.optimizer(0).state.values())
    for _ in range(3):
        pool.train_step(0, x.cuda(), y.cuda())
        twin.train_step(0, x, y)
    pool.to("cpu")
    assert not pool.optimizer(0).defaults["fused"]
    pool.train_step(0, x, y)
    twin.train_step(0, x, y)
    for k, v in _signal(twin.params(0)).items():
        torch.testing.assert_close(pool.params(0)[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_state_round_trip_continues_identically_with_ranges_and_parking(tmp_path):
    kw = {"size": 3, "max_online_steps": 5, "steps_per_visit": (1, 3), "park_device": "cpu"}
    pool, g = _pool(**kw), torch.Generator().manual_seed(4)
    x, y = _batch()
    for visit in range(5):
        pool.train_step(visit % 3, x, y, generator=g)
    torch.save({"pool": pool.state_dict(), "generator": g.get_state()}, tmp_path / "pool.pt")
    saved = torch.load(tmp_path / "pool.pt", weights_only=True)
    restored, twin = _pool(**{**kw, "seed": 9}), _pool(**{**kw, "seed": 9})
    restored.load_state_dict(saved["pool"])
    twin.load_state_dict(saved["pool"])  # the same dict twice: the pools must not share tensors
    g2 = torch.Generator()
    g2.set_state(saved["generator"])
    for visit in range(5, 20):
        a, b = pool.train_step(visit % 3, x, y, generator=g), restored.train_step(visit % 3, x, y, generator=g2)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), visit
    assert sum(pool.reset_count(i) for i in range(3)) > 0
    _same_members(pool, restored)
    # Training the restored pool changed neither the twin nor the loaded dict.
    for i, saved_member in enumerate(saved["pool"]["members"]):
        for k, v in saved_member["params"].items():
            assert torch.equal(twin.params(i)[k], v)
        twin_state = twin.optimizer(i).state_dict()["state"]
        for j, s_saved in saved_member["optimizer"]["state"].items():
            assert all(torch.equal(twin_state[j][key], s_saved[key]) for key in s_saved)
    assert not torch.equal(twin.params(0)["fc.weight"], restored.params(0)["fc.weight"])


def test_state_dict_holds_the_optimizer_state_and_keeps_configured_hyperparameters():
    pool = _pool(size=2, lr=1e-2)
    pool.train_step(0, *_batch())
    state = pool.state_dict()
    assert set(state["members"][0]) == {"params", "buffers", "optimizer", "step", "resets"}
    assert len(state["members"][0]["optimizer"]["state"]) == len(pool.params(0))
    other = _pool(size=2, lr=1e-3)
    other.load_state_dict(state)
    assert other.optimizer(0).param_groups[0]["lr"] == 1e-3  # as configured, like max_online_steps
    exp_avg = next(iter(other.optimizer(0).state.values()))["exp_avg"]
    assert torch.equal(exp_avg, next(iter(pool.optimizer(0).state.values()))["exp_avg"])


def test_loads_checkpoints_of_the_hand_written_adam():
    # The earlier format: exp_avg / exp_avg_sq dicts and an adam_step count per member.
    pool, x, y = _pool(size=2, max_online_steps=3, staggered=False), *_batch()
    for _ in range(2):
        pool.train_step(0, x, y)
    legacy = pool.state_dict()
    for i, m in enumerate(legacy["members"]):
        opt_state = m.pop("optimizer")["state"]
        names = list(pool.params(i))
        m["exp_avg"] = {k: opt_state[j]["exp_avg"] for j, k in enumerate(names)} if opt_state else {}
        m["exp_avg_sq"] = {k: opt_state[j]["exp_avg_sq"] for j, k in enumerate(names)} if opt_state else {}
        m["adam_step"] = int(opt_state[0]["step"].item()) if opt_state else 0
    restored = _pool(size=2, max_online_steps=3, staggered=False)
    restored.load_state_dict(legacy)
    for _ in range(4):
        for i in range(2):
            a, b = pool.train_step(i, x, y), restored.train_step(i, x, y)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    _same_members(pool, restored)


# ----------------------------------------------------------------------------------- torch.compile of the features
def _eager_backend_compile(calls: list):
    """torch.compile with the ``eager`` backend (dynamo's tracing without inductor's seconds of codegen)."""
    real_compile = torch.compile

    def fake(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    return fake


def _grad_features(pool: ModelPool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    f = pool.features(0, x)
    f.square().sum().backward()
    return f.detach(), x.grad


def test_compiled_features_match_eager_and_training_stays_eager(monkeypatch) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    calls: list = []
    monkeypatch.setattr(torch, "compile", _eager_backend_compile(calls))
    eager = ModelPool(lambda: TinyNet(), size=2, max_online_steps=5, seed=3)
    compiled = ModelPool(lambda: TinyNet(), size=2, max_online_steps=5, seed=3, compile_features=True)
    x, y = _batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled.features(0, x), eager.features(0, x))
    for a, b in zip(_grad_features(compiled, x), _grad_features(eager, x), strict=True):
        torch.testing.assert_close(a, b)
    # Training passes and features with batch statistics run eagerly and change nothing compiled.
    torch.testing.assert_close(compiled.train_step(0, x, y), eager.train_step(0, x, y))
    torch.testing.assert_close(compiled.features(0, x, train=True), eager.features(0, x, train=True))
    with torch.no_grad():  # the updated parameters reach the compiled pass (they are its inputs, not constants)
        torch.testing.assert_close(compiled.features(0, x), eager.features(0, x))
    assert len(calls) == 1 and calls[0]["dynamic"] is False


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch) -> None:
    import torch._dynamo

    def broken(fn, **kwargs):
        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no C++ compiler"), None)

        return run

    monkeypatch.setattr(torch, "compile", broken)
    pool = ModelPool(lambda: TinyNet(), size=1, seed=0, compile_features=True)
    reference = ModelPool(lambda: TinyNet(), size=1, seed=0)
    x, _ = _batch()
    with pytest.warns(UserWarning, match="could not compile the pool's feature pass"):
        out = pool.features(0, x)
    torch.testing.assert_close(out, reference.features(0, x))
    assert pool.compile_features is False


@pytest.mark.slow
def test_compiled_features_with_inductor() -> None:
    """The real compiler (inductor, a C++ toolchain on the CPU): the same features and gradients as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = ModelPool(lambda: TinyNet(), size=1, seed=1)
    compiled = ModelPool(lambda: TinyNet(), size=1, seed=1, compile_features=True)
    x, _ = _batch()
    for a, b in zip(_grad_features(compiled, x), _grad_features(eager, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
