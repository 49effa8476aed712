"""``DistillationMethod``: the manual-optimisation template every method fills in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_distill.synthetic.base import SyntheticSet


@dataclass
class MetaStep:
    """What ``outer_loss`` returns: the loss to back-propagate into the synthetic set and values to log."""

    loss: Tensor
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class DistillationMethod(L.LightningModule):
    """Base of every distillation method.

    One ``training_step`` is one outer (meta) update: the synthetic set is materialised, the method's
    :meth:`outer_loss` runs the inner solve as a differentiable sub-routine, the loss is back-propagated into
    the synthetic set, the synthetic optimiser steps, and :meth:`after_outer_step` updates the method's own
    networks (model pools, students). Inner networks must be held functionally (parameter dicts), never as
    registered submodules, so that DDP only ever sees the synthetic set.

    A step whose loss or gradients are not finite is skipped (counted in ``train/skipped_steps``), so no NaN
    ever reaches the synthetic set.

    Args:
        synthetic: the learnable synthetic set (any :class:`SyntheticSet`; shapes are taken from the data).
        syn_optimizer: optimiser factory for the synthetic set's parameters; ``None`` uses the method's default.
        syn_scheduler: optional learning-rate scheduler factory, stepped once per outer step.
        augment: optional differentiable augmentation (e.g. :class:`~lightning_distill.augment.DSA`).
        seed: seeds the method's own randomness (initialisation, augmentation, pools); offset by the DDP rank.
    """

    #: Whether the method learns the synthetic set (the random baseline does not).
    learns: bool = True

    def __init__(
        self,
        synthetic: SyntheticSet,
        syn_optimizer: OptimizerCallable | None = None,
        syn_scheduler: LRSchedulerCallable | None = None,
        augment: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Collects the init arguments of the whole subclass chain; modules and callables are recorded apart.
        self.save_hyperparameters(ignore=["synthetic", "syn_optimizer", "syn_scheduler", "augment"])
        self.automatic_optimization = False
        self.synthetic = synthetic
        self.syn_optimizer = syn_optimizer
        self.syn_scheduler = syn_scheduler
        self.augment = augment
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.data_info: dict[str, Any] = {}
        self.skipped_steps = 0

    # ----------------------------------------------------------------------------------------------- hooks
    def outer_loss(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaStep | None:
        """The meta-objective on one real batch; ``None`` means there is nothing to learn this step."""
        raise NotImplementedError

    def after_outer_step(self, x_real: Tensor, y_real: Tensor) -> dict[str, float | Tensor]:
        """Work after the synthetic update (model pools, students); returns values to log."""
        return {}

    def setup_method(self, datamodule: L.LightningDataModule) -> None:
        """Build the method's own state (pools, teachers) once the data and the synthetic set exist."""

    def default_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser used when no ``syn_optimizer`` is given."""
        return torch.optim.Adam(params, lr=1e-3)

    # ------------------------------------------------------------------------------------------ lifecycle
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "x_train"):
            raise RuntimeError(
                f"{type(self).__name__} needs a RealDataModule (e.g. MNISTDataModule) passed as "
                "trainer.fit(method, datamodule=...), so that it can initialise the synthetic set from real data"
            )
        self.generator.manual_seed(self.seed + self.global_rank)
        self.synthetic.build(dm.num_classes, dm.image_shape)
        self.synthetic.to(self.device)
        # Values from real data; a checkpoint restore (resume) overwrites them after this hook.
        self.synthetic.initialise(dm.x_train, dm.y_train, self.generator)
        self.data_info = describe_datamodule(dm)
        self.setup_method(dm)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.synthetic.parameters() if p.requires_grad]
        if not params:
            return None
        opt = self.syn_optimizer(params) if self.syn_optimizer is not None else self.default_optimizer(params)
        if self.syn_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.syn_scheduler(opt), "interval": "step"}}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x_real, y_real = batch
        x_syn, y_syn = self.synthetic()
        step = self.outer_loss(x_syn, y_syn, x_real, y_real)
        logs: dict[str, float | Tensor] = {}
        if step is not None:
            logs.update(step.logs)
            logs.update(self._update_synthetic(step.loss))
        else:
            # Nothing to learn this step: an optimiser step without gradients changes nothing but still counts the
            # outer step, which is how Lightning's manual optimisation advances global_step (and reaches max_steps).
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            opt.step()
        logs.update(self.after_outer_step(x_real, y_real))
        logs["train/skipped_steps"] = float(self.skipped_steps)
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x_real))
        if step is not None:
            self.log("loss", step.loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=len(x_real))

    def _update_synthetic(self, loss: Tensor) -> dict[str, float | Tensor]:
        opt = self.optimizers()
        if not torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            opt.step()
            self.skipped_steps += 1
            return {}
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        named = [(n, p) for n, p in self.synthetic.named_parameters() if p.grad is not None]
        norms = {n: p.grad.detach().norm() for n, p in named}
        if not all(torch.isfinite(v) for v in norms.values()):
            # A non-finite gradient must never reach the set: drop the gradients, count the skip. The step without
            # gradients leaves the set unchanged but keeps global_step counting outer steps.
            opt.zero_grad(set_to_none=True)
            opt.step()
            self.skipped_steps += 1
            return {"train/outer_loss": loss.detach()}
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        logs: dict[str, float | Tensor] = {"train/outer_loss": loss.detach()}
        for n, v in norms.items():
            logs[f"train/grad_norm_{_short(n)}"] = v
        return logs

    # --------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_distill"] = {
            "synthetic_shape": (self.synthetic.num_classes, self.synthetic.image_shape),
            "generator": self.generator.get_state(),
            "data_info": self.data_info,
            "skipped_steps": self.skipped_steps,
            "method_state": self.method_state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightning_distill")
        if state is None:
            return
        num_classes, image_shape = state["synthetic_shape"]
        if num_classes is not None:
            # load_from_checkpoint never runs setup(): build the parameters so load_state_dict finds them.
            self.synthetic.build(num_classes, image_shape)
        self.generator.set_state(state["generator"])
        self.data_info = state["data_info"]
        self.skipped_steps = state["skipped_steps"]
        self.load_method_state_dict(state["method_state"])

    def method_state_dict(self) -> dict[str, Any]:
        """State of the method's functional networks (pools, students) for checkpoints."""
        return {}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state_dict` returned."""

    # -------------------------------------------------------------------------------------------- export
    def export_payload(self) -> dict[str, Any]:
        """The current synthetic set in the export format (a detached CPU snapshot with its metadata)."""
        from lightning_distill.export import build_export

        step = int(self.trainer.global_step) if self._trainer is not None else None
        return build_export(self.synthetic, self.data_info, type(self).__name__, self.config(), self.seed, step)

    def config(self) -> dict[str, Any]:
        """The method's configuration, recorded in exports (plain values only)."""
        hp = {k: _plain(v) for k, v in self.hparams.items()}
        hp["synthetic"] = {"class": type(self.synthetic).__name__, "repr": self.synthetic.extra_repr()}
        return hp


def describe_datamodule(dm: L.LightningDataModule) -> dict[str, Any]:
    """What an export records about the real data: name, classes and how to rebuild the DataModule."""
    prep = dm.preprocessing
    return {
        "dataset": getattr(dm, "name", type(dm).__name__),
        "num_classes": int(dm.num_classes),
        "image_shape": tuple(int(s) for s in dm.image_shape),
        "class_names": [str(c) for c in getattr(dm, "class_names", [])],
        "preprocessing": prep.to_dict() if hasattr(prep, "to_dict") else dict(prep),
        "datamodule": {
            "class_path": f"{type(dm).__module__}.{type(dm).__qualname__}",
            # LightningCLI adds private keys (``_class_path``); the device is the run's, not the data's.
            "init_args": {
                k: _plain(v)
                for k, v in dict(getattr(dm, "hparams", {})).items()
                if not k.startswith("_") and k != "device"
            },
        },
    }


def _short(name: str) -> str:
    return {"images": "x", "labels": "y"}.get(name.split(".")[-1], name.replace(".", "_"))


def _plain(v: Any) -> Any:
    """Reduce a value to what ``torch.load(weights_only=True)`` and JSON can hold."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)
