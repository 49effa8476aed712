"""An EMA of the synthetic set added by recipe (Lightning's EMAWeightAveraging) changes what export and evaluation
see, and nothing else: the set being learned follows the same trajectory with or without it."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_distill.callbacks import ExportDistilled
from lightning_distill.export import load_distilled
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm
from tests.toy_gradient_method import ToyGradients


class _Trajectory(L.Callback):
    """Records the live set and the method's view after every outer step."""

    def __init__(self):
        self.live, self.views = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.live.append(pl_module.synthetic.images.detach().clone())
        self.views.append(pl_module.distilled_view())


def _fit(root, tmp_path, ema: bool, steps: int = 4):
    L.seed_everything(0, verbose=False)
    method = ToyGradients(synthetic=PixelSet(ipc=2), seed=0)
    record = _Trajectory()
    # Lightning runs callbacks in list order: the recorder sees each step after the EMA has taken it in.
    callbacks = ([EMAWeightAveraging(decay=0.5)] if ema else []) + [record, ExportDistilled()]
    trainer = quiet_trainer(tmp_path, steps, callbacks)
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=64))
    return method, record, trainer


def test_ema_changes_the_export_and_nothing_else(data_root, tmp_path):
    _, plain, _ = _fit(data_root, tmp_path / "plain", ema=False)
    method, averaged, trainer = _fit(data_root, tmp_path / "ema", ema=True)
    # The set being learned is the same, step for step.
    for a, b in zip(plain.live, averaged.live, strict=True):
        assert torch.equal(a, b)
    # What everything outside the method sees is the average: the first update copies the set, then
    # ema <- 0.5 * ema + 0.5 * live.
    ema = averaged.live[0]
    for t, view in enumerate(averaged.views):
        if t > 0:
            ema = 0.5 * ema + 0.5 * averaged.live[t]
        assert view.source == "average"
        torch.testing.assert_close(view.images, ema)
        assert torch.equal(view.labels, torch.arange(10).repeat_interleave(2))  # hard labels are not averaged away
    assert all(v.source == "live" for v in plain.views)
    assert not torch.equal(averaged.views[-1].images, averaged.live[-1])
    exported = load_distilled(tmp_path / "ema" / "distilled.pt")
    assert exported["view_source"] == "average"
    torch.testing.assert_close(exported["images"], ema)
    assert torch.equal(exported["labels"], torch.arange(10).repeat_interleave(2))
    assert not torch.equal(exported["images"], load_distilled(tmp_path / "plain" / "distilled.pt")["images"])
