"""``ContinualLearningEval``: score the current set in the class-incremental protocol while it is learned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_distill.eval import NO_FLIP_DATASETS, get_protocol
from lightning_distill.eval.continual import Memory, class_orders, run_continual, split_classes


class ContinualLearningEval(L.Callback):
    """The class-incremental protocol on the set being learned, and the protocol settings of a continual recipe.

    Every ``every_n_steps`` outer steps and when training ends, for each class order (``orders``: seeds of
    ``numpy.random.RandomState(seed).permutation(C)``) the classes are split into ``steps`` equal steps; after step
    ``s`` the memory holds the current set's images of every class seen so far (the method's ``distilled_view()``),
    and ``repeats`` fresh ``C``-way networks are trained from scratch on it under ``protocol`` and tested on the
    ``split`` images of the seen classes only. Logged: ``eval/continual/acc_step<s>`` (mean over orders and networks)
    and ``eval/continual/acc_avg`` (the average over steps); each evaluation is kept in :attr:`history` (saved in
    checkpoints).

    This scores a set distilled on all classes at once, split by class afterwards: a quick proxy during training.
    The field's protocol distils each step from its own classes' real data only: ``lightning-distill continual
    --config RECIPE`` (or ``benchmarks/continual.py``) runs it, and reads its settings (steps, orders, protocol,
    repeats, evaluation length) from this callback in the recipe.

    Args:
        steps: class-incremental steps (the classes must split evenly; 5 for MNIST/Fashion-MNIST, 5 or 10 for
            CIFAR-100).
        orders: seeds of the class orders (the field uses 0..4 on CIFAR-100, 0..2 on digits here).
        protocol: evaluation protocol (``dc`` for hard labels, ``krr`` for learned labels, ``rtp``).
        repeats: fresh networks per step and order.
        every_n_steps: evaluate every N outer steps; 0 only when training ends.
        at_end: evaluate when training ends.
        split: ``val`` (held out from train; the default, nothing is selected on test) or ``test`` (reporting).
        eval_steps: override the protocol's optimiser steps (CPU budgets).
        epochs: override the protocol's epochs.
        arch_kwargs: options of the protocol's network (e.g. ``{"width": 64}``).
        random_baseline: also evaluate random real memory of the set's storage (the set's ``ipc`` images per class
            drawn from the training split).
        seed: base seed of the evaluation networks.
        device: where the networks train (default: the module's device).
    """

    def __init__(
        self,
        steps: int = 5,
        orders: Sequence[int] = (0, 1, 2),
        protocol: str = "dc",
        repeats: int = 1,
        every_n_steps: int = 0,
        at_end: bool = True,
        split: Literal["val", "test"] = "val",
        eval_steps: int | None = None,
        epochs: int | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        random_baseline: bool = False,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        orders = [orders] if isinstance(orders, int) else list(orders)
        if not orders or len(set(orders)) != len(orders):
            raise ValueError(f"orders must list distinct seeds (at least one), got {orders!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end), got {every_n_steps!r}")
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        for name, value in (("eval_steps", eval_steps), ("epochs", epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null (the protocol's), got {value!r}")
        self.protocol = get_protocol(protocol).name
        self.steps, self.orders, self.repeats = steps, [int(o) for o in orders], repeats
        self.every_n_steps, self.at_end, self.split = every_n_steps, at_end, split
        self.eval_steps, self.epochs = eval_steps, epochs
        self.arch_kwargs = dict(arch_kwargs or {})
        self.random_baseline = random_baseline
        self.seed, self.device = seed, device
        #: One dict per evaluation: outer step, per-order curves, the mean curve and its average.
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None

    def settings(self) -> dict[str, Any]:
        """The protocol settings the full (distil-per-step) run takes from this callback."""
        return {
            "steps": self.steps,
            "orders": list(self.orders),
            "protocol": self.protocol,
            "repeats": self.repeats,
            "eval_steps": self.eval_steps,
            "eval_epochs": self.epochs,
            "arch_kwargs": dict(self.arch_kwargs) or None,
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(protocol=self.protocol, steps=self.steps, split=self.split)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if getattr(dm, "num_classes", None) is not None:
            split_classes(range(dm.num_classes), self.steps)  # refuses an uneven split before any training

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run the protocol on the current set now (all ranks call it; rank 0 trains); returns the history entry."""
        step = int(trainer.global_step)
        entry: dict[str, Any] | None = None
        if trainer.is_global_zero:
            modes = {m: m.training for m in pl_module.modules()}
            device = torch.device(self.device) if self.device is not None else pl_module.device
            try:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    entry = self._run(trainer, pl_module, step, device)
            finally:
                for m, mode in modes.items():
                    m.training = mode
        entry = trainer.strategy.broadcast(entry, src=0)
        self.history.append(entry)
        self._last_step = step
        for s, acc in enumerate(entry["curve"]):
            trainer.callback_metrics[f"eval/continual/acc_step{s + 1}"] = torch.tensor(acc)
        trainer.callback_metrics["eval/continual/acc_avg"] = torch.tensor(entry["average"])
        metrics = {f"eval/continual/acc_step{s + 1}": a for s, a in enumerate(entry["curve"])}
        metrics["eval/continual/acc_avg"] = entry["average"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        rank_zero_info(f"continual ({self.protocol}, {self.steps} steps): {[round(a, 2) for a in entry['curve']]}")
        return entry

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, device: torch.device) -> dict[str, Any]:
        dm = trainer.datamodule
        x_eval, y_eval = getattr(dm, f"x_{self.split}"), getattr(dm, f"y_{self.split}")
        view = pl_module.distilled_view()
        images, labels, ids = view.images.cpu(), view.labels.cpu(), view.class_ids.cpu()
        k = int(dm.num_classes)
        per_class_floats = int(view.storage.get("floats", images.numel())) / k
        dataset = getattr(pl_module, "data_info", {}).get("dataset") or getattr(dm, "name", "")
        flip = dataset not in NO_FLIP_DATASETS
        ipc = int(getattr(pl_module.synthetic, "ipc", 1))
        results = []
        for seed in self.orders:
            splits = split_classes(class_orders(k, [seed])[0], self.steps)

            def memory(s: int, classes: list[int]) -> Memory:
                keep = torch.isin(ids, torch.tensor(classes))
                return Memory(images[keep], labels[keep], classes, int(per_class_floats * len(classes)))

            def baseline(s: int, classes: list[int], mem: Memory, seed: int = seed) -> Memory:
                from lightning_distill.eval.continual import random_memory

                g = torch.Generator().manual_seed(self.seed + 100 * seed + s)
                return random_memory(dm.x_train.cpu(), dm.y_train.cpu(), classes, ipc, g)

            result = run_continual(
                memory,
                splits,
                x_eval.cpu(),
                y_eval.cpu(),
                k,
                protocol=self.protocol,
                repeats=self.repeats,
                seed=self.seed + step,
                random_baseline=baseline if self.random_baseline else None,
                device=device,
                log=None,
                steps=self.eval_steps,
                epochs=self.epochs,
                arch_kwargs=self.arch_kwargs or None,
                flip=flip,
            )
            results.append(result.to_dict())
        curve = [float(sum(r["curve"][s] for r in results) / len(results)) for s in range(self.steps)]
        entry = {
            "step": step,
            "protocol": self.protocol,
            "split": self.split,
            "orders": list(self.orders),
            "curve": curve,
            "average": float(sum(curve) / len(curve)),
            "results": results,
        }
        if self.random_baseline:
            rc = [float(sum(r["random_curve"][s] for r in results) / len(results)) for s in range(self.steps)]
            entry["random_curve"], entry["random_average"] = rc, float(sum(rc) / len(rc))
        return entry
