"""The contract every method meets on every kind of set.

A new method joins with one line in ``METHODS``, a new parameterisation with one line in ``SETS``; the suite runs
over their product (``COMBOS``): gradients (a loss or ready gradients), checkpoint and export round-trips, exact
resume and seeded determinism.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill.callbacks import ExportDistilled
from lightning_distill.data import DistilledDataModule
from lightning_distill.export import load_distilled
from lightning_distill.methods import RCIG, FRePo, MemoriesBPTT, RandomSubset
from lightning_distill.optim import CosineDecay
from lightning_distill.synthetic import AddressableMemories, PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm
from tests.test_apm import tiny_apm as _apm
from tests.toy_gradient_method import ToyGradients
from tests.toy_sets import MixtureSet

METHODS = {
    "random": lambda synthetic, seed: RandomSubset(synthetic=synthetic, seed=seed),
    "frepo": lambda synthetic, seed: FRePo(
        synthetic=synthetic,
        arch_kwargs={"width": 8},
        pool_size=3,
        max_online_steps=4,
        syn_scheduler=lambda o: CosineDecay(o, total_steps=10),
        seed=seed,
    ),
    "toy_gradients": lambda synthetic, seed: ToyGradients(synthetic=synthetic, seed=seed),
    "rcig": lambda synthetic, seed: RCIG(
        synthetic=synthetic,
        arch_kwargs={"width": 8, "depth": 2},
        pool_size=3,
        max_online_steps=4,
        inner_steps=3,
        hinv_steps=3,
        tune_lr=False,
        inner_lr=1e-2,
        hinv_lr=1.0,
        seed=seed,
    ),
    "apm": lambda synthetic, seed: _apm(synthetic, seed),
    "memories_bptt": lambda synthetic, seed: MemoriesBPTT(
        synthetic=synthetic, arch_kwargs={"width": 8, "depth": 2}, inner_steps=3, per_class_batch=2, seed=seed
    ),
}

SETS = {
    "pixels_hard": lambda: PixelSet(ipc=2),
    "pixels_learned": lambda: PixelSet(ipc=2, labels="learned"),
    "mixture": lambda: MixtureSet(ipc=2, per_class=3, num_bases=4),
    "memories": lambda: AddressableMemories(ipc=2, num_bases=4, rows_per_class=3),
}

# Every method on every set, except pairs that make no sense: the random baseline copies real images, which only a
# pixel set can hold, and learned labels mean nothing to it.
# APM's labels are a teacher's logits, so learned labels mean nothing to it either.
COMBOS = [
    (m, s)
    for m in METHODS
    for s in SETS
    if not (m == "random" and s != "pixels_hard") and not (m == "apm" and s == "pixels_learned")
]


def _fit(combo, root, tmp_path, seed=0, steps=2, ckpt_path=None, callbacks=None, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    name, set_name = combo
    method = METHODS[name](SETS[set_name](), seed)
    dm = tiny_mnist_dm(root, batch_size=64, seed=seed)
    trainer = quiet_trainer(tmp_path, steps, [ExportDistilled(), *(callbacks or [])], **trainer_kwargs)
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    return method, dm, trainer


# The toy factorised set (MixtureSet) checks the same seams as AddressableMemories, the real one; under the methods
# whose step is a whole inner solve (RCIG, BPTT, APM) its rows run with the slow tests only, which keeps the default
# suite near ten minutes on 2 cores. ``pytest -m slow`` runs them.
SLOW_COMBOS = {(m, "mixture") for m in ("rcig", "memories_bptt", "apm")}


@pytest.fixture(
    params=[pytest.param(c, marks=pytest.mark.slow) if c in SLOW_COMBOS else c for c in COMBOS],
    ids=lambda c: f"{c[0]}-{c[1]}",
)
def combo(request):
    return request.param


def test_two_steps_update_or_keep_the_set(combo, data_root, tmp_path):
    method, dm, _ = _fit(combo, data_root, tmp_path, steps=2)
    view = method.distilled_view()
    assert torch.isfinite(view.images).all()
    r = method.synthetic.images_per_class
    assert view.images.shape == (r * dm.num_classes, *dm.image_shape)
    assert torch.equal(view.class_ids, torch.arange(dm.num_classes).repeat_interleave(r))
    if not method.learns:
        # The baseline keeps real training images untouched.
        flat = dm.x_train.flatten(1)
        for img in view.images.flatten(1):
            assert (flat - img).abs().amax(1).min() < 1e-6
    assert method.skipped_steps == 0


def test_gradients_reach_every_meta_parameter(combo, data_root, tmp_path):
    method, dm, _ = _fit(combo, data_root, tmp_path, steps=1)
    x_real, y_real = dm.x_train[:64], dm.y_train[:64]
    x_syn, y_syn = method.synthetic()
    step = method.outer_loss(x_syn, y_syn, x_real, y_real)
    if not method.learns:
        assert step is None
        return
    params = method.named_meta_parameters()
    if step.loss is not None:
        grads = dict(zip(params, torch.autograd.grad(step.loss, list(params.values())), strict=True))
    else:
        grads = step.grads
    assert set(grads) == set(params)
    for n, g in grads.items():
        assert g.shape == params[n].shape and torch.isfinite(g).all() and g.abs().sum() > 0, n
    # Every meta-parameter sits in exactly one named optimiser group.
    groups = method.optimizer_groups()
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params.values())


def test_checkpoint_round_trip(combo, data_root, tmp_path):
    method, dm, trainer = _fit(combo, data_root, tmp_path, steps=2)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = type(method).load_from_checkpoint(ckpt, synthetic=SETS[combo[1]](), weights_only=False)
    assert method.state_dict().keys() == loaded.state_dict().keys()
    for (k, a), (_, b) in zip(method.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.data_info["dataset"] == "mnist"
    torch.testing.assert_close(loaded.generator.get_state(), method.generator.get_state())


def test_export_round_trip(combo, data_root, tmp_path):
    method, dm, _ = _fit(combo, data_root, tmp_path, steps=2)
    payload = load_distilled(tmp_path / "distilled.pt")
    assert (tmp_path / "distilled.png").stat().st_size > 0
    view = method.distilled_view()
    assert torch.equal(payload["images"], view.images)
    assert payload["ipc"] == 2 and payload["num_classes"] == 10 and payload["dataset"] == "mnist"
    assert payload["images_per_class"] == method.synthetic.images_per_class
    assert payload["method"] == type(method).__name__
    assert payload["step"] == 2  # the outer step the export was taken at
    assert set(payload["extras"]) == set(method.synthetic.export_extras())
    assert payload["storage"]["floats"] == sum(t.numel() for t in method.synthetic.export_extras().values()) or (
        not payload["extras"] and payload["storage"]["floats"] == payload["images"].numel()
    )
    served = DistilledDataModule.from_file(tmp_path / "distilled.pt", batch_size=7)
    xb, yb = next(iter(served.train_dataloader()))
    assert xb.shape == (7, 1, 28, 28) and len(yb) == 7
    assert served.preprocessing is not None
    raw = dm.load_split("test")[0][:4].float() / 255
    torch.testing.assert_close(served.preprocessing.apply(raw), dm.preprocessing.apply(raw))


def test_resume_from_checkpoint_matches_an_uninterrupted_run(combo, data_root, tmp_path):
    straight, _, _ = _fit(combo, data_root, tmp_path / "a", steps=3)
    first, _, trainer = _fit(combo, data_root, tmp_path / "b", steps=2)
    ckpt = tmp_path / "b" / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _, _ = _fit(combo, data_root, tmp_path / "c", steps=3, ckpt_path=str(ckpt))
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert straight.method_state_dict().keys() == resumed.method_state_dict().keys()


def test_same_seed_same_result(combo, data_root, tmp_path):
    a, _, _ = _fit(combo, data_root, tmp_path / "a", seed=3)
    b, _, _ = _fit(combo, data_root, tmp_path / "b", seed=3)
    c, _, _ = _fit(combo, data_root, tmp_path / "c", seed=4)
    va, vb, vc = a.distilled_view(), b.distilled_view(), c.distilled_view()
    assert torch.equal(va.images, vb.images) and torch.equal(va.labels, vb.labels)
    assert not torch.equal(va.images, vc.images)


def test_ipc_above_a_class_count_is_refused_before_allocating(data_root, tmp_path):
    method = FRePo(synthetic=PixelSet(ipc=100000), arch_kwargs={"width": 8})
    with pytest.raises(ValueError, match=r"ipc=100000 needs .* but class \d+ \(\d+\) has \d+: use ipc <= \d+"):
        quiet_trainer(tmp_path, 1).fit(method, datamodule=tiny_mnist_dm(data_root))
    assert not method.synthetic.is_built  # nothing was allocated


def test_a_class_without_images_is_refused(data_root, tmp_path):
    from lightning_distill.data import ArrayDataModule
    from tests.helpers import mnist_subset

    x, y, x_te, y_te = mnist_subset(data_root)
    keep = y != 3
    classes = [str(c) for c in range(10)]
    dm = ArrayDataModule(x_train=x[keep], y_train=y[keep], x_test=x_te, y_test=y_te, classes=classes, val_size=10)
    with pytest.raises(ValueError, match=r"class 3 \(3\) has no training images"):
        quiet_trainer(tmp_path, 1).fit(RandomSubset(synthetic=PixelSet(ipc=1, init="noise")), datamodule=dm)


def test_consecutive_non_finite_steps_stop_the_run(data_root, tmp_path):
    from lightning_distill.methods import NonFiniteMetaStep

    method = ToyGradients(synthetic=PixelSet(ipc=1), seed=0)
    method.max_consecutive_skips = 3
    original = method.outer_loss

    def poisoned(*args):
        step = original(*args)
        step.grads = {k: torch.full_like(v, float("nan")) for k, v in step.grads.items()}
        return step

    method.outer_loss = poisoned
    with pytest.raises(NonFiniteMetaStep, match="3 outer steps in a row had a non-finite meta-gradient"):
        quiet_trainer(tmp_path, 10).fit(method, datamodule=tiny_mnist_dm(data_root))
    assert method.skipped_steps == 3
