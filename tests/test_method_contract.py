"""The contract every method meets, run over every method: a new method joins with one line in METHODS."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill.callbacks import ExportDistilled
from lightning_distill.data import DistilledDataModule
from lightning_distill.export import load_distilled
from lightning_distill.methods import FRePo, RandomSubset
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm

METHODS = {
    "random": lambda seed: RandomSubset(synthetic=PixelSet(ipc=2), seed=seed),
    "frepo": lambda seed: FRePo(
        synthetic=PixelSet(ipc=2, labels="learned"),
        arch_kwargs={"width": 8},
        pool_size=3,
        max_online_steps=4,
        decay_steps=10,
        seed=seed,
    ),
}


def _fit(name, root, tmp_path, seed=0, steps=2, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    method = METHODS[name](seed)
    dm = tiny_mnist_dm(root, batch_size=64, seed=seed)
    trainer = quiet_trainer(tmp_path, steps, [ExportDistilled()], **trainer_kwargs)
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    return method, dm, trainer


@pytest.fixture(params=sorted(METHODS))
def name(request):
    return request.param


def test_two_steps_update_or_keep_the_set(name, data_root, tmp_path):
    L.seed_everything(0, verbose=False)
    method, dm, _ = _fit(name, data_root, tmp_path, steps=2)
    x_syn, y_syn = method.synthetic()
    assert torch.isfinite(x_syn).all()
    assert x_syn.shape == (2 * dm.num_classes, *dm.image_shape)
    if not method.learns:
        # The baseline keeps real training images untouched.
        flat = dm.x_train.flatten(1)
        for img in x_syn.flatten(1):
            assert (flat - img).abs().amax(1).min() < 1e-6


def test_gradients_reach_the_synthetic_set(name, data_root, tmp_path):
    method, dm, _ = _fit(name, data_root, tmp_path, steps=1)
    x_real, y_real = dm.x_train[:64], dm.y_train[:64]
    x_syn, y_syn = method.synthetic()
    step = method.outer_loss(x_syn, y_syn, x_real, y_real)
    if not method.learns:
        assert step is None
        return
    step.loss.backward()
    grads = [p.grad for p in method.synthetic.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_checkpoint_round_trip(name, data_root, tmp_path):
    method, dm, trainer = _fit(name, data_root, tmp_path, steps=2)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    synthetic = type(method.synthetic)(ipc=2, labels=method.synthetic.label_kind)
    loaded = type(method).load_from_checkpoint(ckpt, synthetic=synthetic, weights_only=False)
    for (k, a), (_, b) in zip(
        method.synthetic.state_dict().items(), loaded.synthetic.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert loaded.data_info["dataset"] == "mnist"
    torch.testing.assert_close(loaded.generator.get_state(), method.generator.get_state())


def test_export_round_trip(name, data_root, tmp_path):
    method, dm, _ = _fit(name, data_root, tmp_path, steps=2)
    payload = load_distilled(tmp_path / "distilled.pt")
    assert (tmp_path / "distilled.png").stat().st_size > 0
    x_syn, y_syn = method.synthetic()
    assert torch.equal(payload["images"], x_syn.detach())
    assert payload["ipc"] == 2 and payload["num_classes"] == 10 and payload["dataset"] == "mnist"
    assert payload["method"] == type(method).__name__
    assert payload["step"] == 2  # the outer step the export was taken at
    served = DistilledDataModule.from_file(tmp_path / "distilled.pt", batch_size=7)
    xb, yb = next(iter(served.train_dataloader()))
    assert xb.shape == (7, 1, 28, 28) and len(yb) == 7
    assert served.preprocessing is not None
    raw = dm.load_split("test")[0][:4].float() / 255
    torch.testing.assert_close(served.preprocessing.apply(raw), dm.preprocessing.apply(raw))


def test_resume_from_checkpoint_matches_an_uninterrupted_run(name, data_root, tmp_path):
    straight, _, _ = _fit(name, data_root, tmp_path / "a", steps=3)
    first, _, trainer = _fit(name, data_root, tmp_path / "b", steps=2)
    ckpt = tmp_path / "b" / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _, _ = _fit(name, data_root, tmp_path / "c", steps=3, ckpt_path=str(ckpt))
    for a, b in zip(straight.synthetic(), resumed.synthetic(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert straight.method_state_dict().keys() == resumed.method_state_dict().keys()


def test_same_seed_same_result(name, data_root, tmp_path):
    a, _, _ = _fit(name, data_root, tmp_path / "a", seed=3)
    b, _, _ = _fit(name, data_root, tmp_path / "b", seed=3)
    c, _, _ = _fit(name, data_root, tmp_path / "c", seed=4)
    for (xa, ya), (xb, yb) in [(a.synthetic(), b.synthetic())]:
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.synthetic()[0], c.synthetic()[0])
