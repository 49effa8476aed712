"""One outer step under ``strategy="ddp"`` on 2 CPU processes (gloo), compared with one process on the union batch.

Run by tests/test_ddp.py as ``python -m tests.ddp_step METHOD SET DATA_ROOT OUT``. Every rank records the real
batch it drew; in ``before_meta_update`` (gradients all-reduced, parameters not yet stepped) the ranks gather their
batches and rank 0 computes the single-process gradient of the same step on the union batch with plain autograd,
then writes both, and after the run the set each rank holds (it must be replicated), to ``OUT/result.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch


def main() -> None:
    name, set_name, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    torch.set_num_threads(1)
    from tests.helpers import tiny_mnist_dm
    from tests.test_method_contract import METHODS, SETS

    L.seed_everything(0, verbose=False)
    method = METHODS[name](SETS[set_name](), 0)
    seen: dict[str, torch.Tensor] = {}
    record: dict[str, object] = {}
    original = method.before_meta_update

    def before_meta_update(params):
        # Collective: every rank gathers both shards of the real batch.
        x_all = method.all_gather(seen["x"]).flatten(0, 1)
        y_all = method.all_gather(seen["y"]).flatten(0, 1)
        if method.global_rank == 0:
            x_syn, y_syn = method.synthetic()
            step = method.outer_loss(x_syn, y_syn, x_all, y_all)
            named = method.named_meta_parameters()
            if step.loss is not None:
                ref = dict(
                    zip(named, torch.autograd.grad(step.loss, list(named.values()), allow_unused=True), strict=True)
                )
            else:
                ref = dict(step.grads)
            record["ddp"] = {n: p.grad.detach().clone() for n, p in params.items()}
            record["single"] = {n: g.detach().clone() for n, g in ref.items() if g is not None}
        return original(params)

    method.before_meta_update = before_meta_update

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["x"], seen["y"] = batch

        def on_train_end(self, trainer, pl_module):
            sets = pl_module.all_gather(pl_module.synthetic.images.detach())
            if trainer.is_global_zero:
                record["sets"] = sets.clone()
                record["world_size"] = trainer.world_size

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[Recorder()],
    )
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=32))
    if trainer.is_global_zero:
        torch.save(record, out / "result.pt")


if __name__ == "__main__":
    main()
