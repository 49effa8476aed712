"""AddressableMemories (budget arithmetic, generation, export) and MemoriesBPTT (hyper-gradient, task sampling,
regulariser, clipping), and the memory set under FRePo."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.callbacks import ExportDistilled
from lightning_distill.export import load_distilled
from lightning_distill.methods import FRePo, MemoriesBPTT
from lightning_distill.synthetic import AddressableMemories, PixelSet, memory_rows_per_class
from tests.helpers import quiet_trainer, tiny_mnist_dm

TINY = {"arch_kwargs": {"width": 8, "depth": 2}, "inner_steps": 3, "per_class_batch": 2}


@pytest.mark.parametrize(
    "shape, classes, budget, r",
    [
        # The reference's worked values (K = 16, ds = 2): shared/reference/methods_memories_apm.md §1.1.
        ((1, 28, 28), 10, 1, 29),
        ((3, 32, 32), 10, 1, 115),
        ((3, 32, 32), 10, 10, 1843),
        ((3, 32, 32), 100, 1, 184),
        ((3, 32, 32), 100, 10, 1912),
        ((3, 64, 64), 200, 1, 752),
    ],
)
def test_budget_matches_the_worked_values(shape, classes, budget, r):
    assert memory_rows_per_class(budget, classes, shape, num_bases=16, downsample=2) == r


def test_budget_refuses_bases_that_fill_it():
    with pytest.raises(ValueError, match="leave no room for coefficients .* use fewer bases"):
        memory_rows_per_class(1, 10, (1, 28, 28), num_bases=64, downsample=2)
    with pytest.raises(ValueError, match="downsample=3 must divide the image sides 28x28"):
        memory_rows_per_class(1, 10, (1, 28, 28), num_bases=16, downsample=3)


def test_memory_generates_by_index_and_stays_within_budget():
    mem = AddressableMemories(ipc=1, num_classes=10, image_shape=(1, 28, 28))
    mem.initialise(torch.randn(50, 1, 28, 28), torch.arange(10).repeat(5), torch.Generator().manual_seed(0))
    assert mem.images_per_class == 29 and mem.bases.shape == (16, 1, 14, 14) and mem.coefficients.shape == (290, 16)
    x, y = mem()
    assert x.shape == (290, 1, 28, 28) and torch.equal(y, torch.arange(10).repeat_interleave(29))
    idx = torch.tensor([3, 100, 289])
    xi, yi = mem(idx)
    torch.testing.assert_close(xi, x[idx])
    assert torch.equal(yi, y[idx])
    st = mem.storage()
    assert st["floats"] == 16 * 196 + 290 * 16 <= st["pixel_floats"] == 7840
    assert st["ipc_equivalent"] <= 1.0 and st["rows_per_class"] == 29
    assert set(mem.export_extras()) == {"bases", "coefficients"}
    assert set(mem.parameter_groups()) == {"bases", "coefficients"}


def test_real_init_puts_every_class_on_its_own_bases():
    g = torch.Generator().manual_seed(0)
    x_real = torch.randn(100, 1, 28, 28)
    y_real = torch.arange(10).repeat(10)
    mem = AddressableMemories(ipc=1, num_classes=10, image_shape=(1, 28, 28), init="real")
    mem.initialise(x_real, y_real, g)
    owner = torch.arange(16) % 10
    top = mem.coefficients.argmax(1)
    assert torch.equal(owner[top], mem.class_ids())


def test_learned_labels_and_bad_options():
    mem = AddressableMemories(ipc=1, num_classes=10, image_shape=(1, 28, 28), labels="learned")
    assert set(mem.parameter_groups()) == {"bases", "coefficients", "labels"}
    assert mem.storage()["label_floats"] == 290 * 10
    with pytest.raises(ValueError, match="rows_per_class=40 exceeds the budget"):
        AddressableMemories(ipc=1, rows_per_class=40, num_classes=10, image_shape=(1, 28, 28))
    with pytest.raises(ValueError, match="init must be 'xavier' or 'real'"):
        AddressableMemories(ipc=1, init="zeros")


def _fit(method, root, tmp_path, steps=1, callbacks=None):
    quiet_trainer(tmp_path, steps, callbacks).fit(method, datamodule=tiny_mnist_dm(root))
    return method


def test_frepo_on_memories_reaches_bases_and_coefficients(data_root, tmp_path):
    mem = AddressableMemories(ipc=1, num_bases=8, rows_per_class=5)
    method = FRePo(synthetic=mem, arch_kwargs={"width": 8}, pool_size=2, max_online_steps=4, seed=0)
    quiet_trainer(tmp_path, 1).fit(method, datamodule=tiny_mnist_dm(data_root))
    before = {k: v.detach().clone() for k, v in mem.named_parameters()}
    _fit(method, data_root, tmp_path, steps=2, callbacks=[ExportDistilled()])
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name
    payload = load_distilled(tmp_path / "distilled.pt")
    assert payload["extras"]["bases"].shape == (8, 1, 14, 14) and payload["images"].shape == (50, 1, 28, 28)
    assert payload["storage"]["pixel_floats"] == 7840 and payload["storage"]["floats"] <= 7840


def _ready(root, tmp_path, synthetic, **kwargs):
    return _fit(MemoriesBPTT(synthetic=synthetic, **{**TINY, **kwargs}), root, tmp_path)


def _step(method, dm_batch, state):
    method.generator.set_state(state)
    return method.outer_loss(None, None, *dm_batch)


def test_task_sampling_leaves_other_classes_untouched(data_root, tmp_path):
    method = _ready(data_root, tmp_path, AddressableMemories(ipc=1, num_bases=4, rows_per_class=3), task_classes=2)
    dm = method.trainer.datamodule
    state = method.generator.get_state()
    classes = method.draw_classes()
    step = _step(method, (dm.x_train[:200], dm.y_train[:200]), state)
    g = step.grads["synthetic.coefficients"].view(10, 3, 4).abs().sum((1, 2))
    assert len(classes) == 2
    assert (g[classes] > 0).all() and (g.sum() == g[classes].sum())
    assert step.grads["synthetic.bases"].abs().sum() > 0


def test_coefficient_regulariser_adds_its_gradient(data_root, tmp_path):
    mem = AddressableMemories(ipc=1, num_bases=4, rows_per_class=3)
    method = _ready(data_root, tmp_path, mem, coeff_reg="l2", coeff_reg_alpha=0.5)
    dm = method.trainer.datamodule
    batch, state = (dm.x_train[:64], dm.y_train[:64]), method.generator.get_state()
    with_reg = _step(method, batch, state).grads
    method.coeff_reg = "none"
    without = _step(method, batch, state).grads
    coef = mem.coefficients.detach()
    torch.testing.assert_close(
        with_reg["synthetic.coefficients"] - without["synthetic.coefficients"], 0.5 * coef / coef.norm()
    )
    torch.testing.assert_close(with_reg["synthetic.bases"], without["synthetic.bases"])


def test_regulariser_needs_coefficients(data_root, tmp_path):
    with pytest.raises(ValueError, match="coeff_reg='l1' needs a set with learned coefficients"):
        _ready(data_root, tmp_path, PixelSet(ipc=1), coeff_reg="l1")


def test_clipping_and_the_official_optimiser(data_root, tmp_path):
    method = _ready(data_root, tmp_path, PixelSet(ipc=1), clip_norm=1e-6)
    opt = method.optimizers().optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.1 and opt.defaults["momentum"] == 0.5
    p = method.synthetic.images
    p.grad = torch.ones_like(p)
    logs = method.before_meta_update({"synthetic.images": p})
    assert logs["train/grad_norm_total"] > 1e-6
    assert float(p.grad.norm()) == pytest.approx(1e-6, rel=1e-3)


def test_augmentation_must_be_replayable():
    with pytest.raises(ValueError, match="augment must draw replayable parameters"):
        MemoriesBPTT(synthetic=PixelSet(ipc=1), augment=torch.nn.Identity())


def test_hypergradient_is_the_naive_unroll_of_the_method(data_root, tmp_path):
    """The method's gradient (augmented inner steps, memories) equals autograd through the whole unroll."""
    from torch.func import functional_call

    from lightning_distill.augment import DSA
    from lightning_distill.functional.unroll import unroll_sgd_naive
    from lightning_distill.methods.memories import inner_cross_entropy

    mem = AddressableMemories(ipc=1, num_bases=4, rows_per_class=3)
    method = _ready(data_root, tmp_path, mem, augment=DSA(strategy="crop_scale", batchwise=False))
    dm = method.trainer.datamodule
    x_real, y_real = dm.x_train[:64], dm.y_train[:64]
    state = method.generator.get_state()
    step = _step(method, (x_real, y_real), state)
    # Replay the same draws, in the order outer_loss makes them, through the naive create_graph unroll.
    method.generator.set_state(state)
    classes = method.draw_classes()
    net = method.build_network(int(torch.randint(2**62, (1,), generator=method.generator)))
    batches = method.draw_batches(classes)
    aug_params = [method.augment.sample(len(b), method.generator) for b in batches]
    real_params = method.augment.sample(len(x_real), method.generator)
    meta = {n: p.detach().clone().requires_grad_(True) for n, p in mem.named_parameters()}

    def batch_fn(t, m):
        x, y = functional_call(mem, m, (batches[t],))
        return method.augment.apply(x, aug_params[t]), y

    def loss_fn(p, x, y):
        return inner_cross_entropy(functional_call(net, p, (x,)), y)

    params = {n: p.detach() for n, p in net.named_parameters()}
    w_T = unroll_sgd_naive(loss_fn, params, batch_fn, meta, method.inner_steps, method.inner_lr, method.inner_momentum)
    outer = torch.nn.functional.cross_entropy(
        functional_call(net, w_T, (method.augment.apply(x_real, real_params),)), y_real
    )
    ref = torch.autograd.grad(outer, list(meta.values()))
    torch.testing.assert_close(step.value, outer.detach())
    for (n, _), r in zip(meta.items(), ref, strict=True):
        torch.testing.assert_close(step.grads[f"synthetic.{n}"], r, rtol=1e-4, atol=1e-7)


def test_the_papers_evaluation_protocol_is_registered():
    from lightning_distill.eval import get_protocol

    rtp = get_protocol("rtp")
    assert (rtp.optimizer, rtp.lr, rtp.momentum, rtp.weight_decay) == ("sgd", 0.01, 0.9, 0.0)
    assert (rtp.epochs, rtp.batch_size, rtp.schedule, rtp.augment) == (300, 640, "constant", "none")
