"""``CrossArchitectureEval``: train fresh networks of several architectures on the current synthetic set."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_distill.eval import NO_FLIP_DATASETS, get_protocol, train_on_distilled
from lightning_distill.nets import list_nets

DEFAULT_ARCHS = ("convnet", "alexnet", "vgg11", "resnet18")


class CrossArchitectureEval(L.Callback):
    """Score the synthetic set while it is learned: fresh networks of each architecture, trained on a snapshot.

    Every ``every_n_steps`` outer steps, and once more when training ends (unless that step was just evaluated), a
    detached copy of the current set (the method's ``distilled_view()``: an average of the set when a weight-averaging
    callback runs) is taken and ``repeats`` fresh networks of each architecture in ``archs`` are
    trained on it under the named ``protocol`` (:func:`~lightning_distill.eval.train_on_distilled`), then tested on
    the DataModule's held-out validation split (``split="val"``, the default: nothing may ever be selected on the
    test split; ``split="test"`` is for reporting only).

    For each architecture it logs ``eval/<arch>/acc`` (mean accuracy in %) and ``eval/<arch>/acc_std`` to every
    logger of the trainer at ``trainer.global_step``, and puts them into ``trainer.callback_metrics`` so that
    ``ModelCheckpoint(monitor="eval/convnet/acc", mode="max")`` can keep the best set. Every result is also kept in
    :attr:`history` (a list of dicts), which is saved in checkpoints and restored on resume.

    The evaluation neither changes the synthetic set nor the global random state, and leaves the module in the
    training mode it found. Network ``i`` of the evaluation at step ``s`` is seeded with ``seed + s + i``, so
    evaluations at different steps differ and each one is reproducible. Under DDP only global rank 0 trains the
    networks; the results are then broadcast, so every rank holds the same history and metrics. Long evaluations
    keep the other ranks waiting in that broadcast: raise the process-group timeout
    (``DDPStrategy(timeout=...)``) if one evaluation takes longer than it.

    Recipe use::

        trainer:
          callbacks:
            - class_path: lightning_distill.callbacks.CrossArchitectureEval
              init_args: {every_n_steps: 1000, archs: [convnet, resnet18], repeats: 3}

    Args:
        archs: network registry names (see :func:`lightning_distill.nets.list_nets`) to train on the set.
        every_n_steps: evaluate every N outer steps; 0 evaluates only when training ends.
        protocol: the evaluation protocol (``dc`` or ``krr``); recorded with every result.
        repeats: fresh networks per architecture (the mean and std are over them).
        split: where the networks are tested: ``val`` (the held-out part of the training split) or ``test``.
        epochs: overrides the protocol's number of epochs (e.g. a shorter budget during training).
        steps: overrides the protocol's total number of optimiser steps (takes precedence over ``epochs``).
        arch_kwargs: per-architecture network options, e.g. ``{"convnet": {"width": 64}}``, merged over the
            protocol's own options for its default network.
        at_end: also evaluate when training ends.
        flip: allow horizontal flips in the evaluation augmentation; ``None`` decides from the dataset name
            (no flips for digits, :data:`~lightning_distill.eval.NO_FLIP_DATASETS`).
        seed: base seed of the evaluation networks (offset by the outer step).
        device: where to train the networks; ``None`` uses the module's device.
        progress: show a progress bar while the networks train.
    """

    def __init__(
        self,
        archs: Sequence[str] = DEFAULT_ARCHS,
        every_n_steps: int = 0,
        protocol: str = "dc",
        repeats: int = 5,
        split: Literal["val", "test"] = "val",
        epochs: int | None = None,
        steps: int | None = None,
        arch_kwargs: dict[str, dict[str, Any]] | None = None,
        at_end: bool = True,
        flip: bool | None = None,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(archs, str):
            # A bare string would be iterated letter by letter.
            archs = [archs]
        archs = list(archs)
        known = list_nets()
        unknown = [a for a in archs if a not in known]
        if not archs or unknown:
            raise ValueError(
                f"archs must name at least one registered network; unknown: {', '.join(unknown) or '(none given)'}; "
                f"known nets: {', '.join(known)}"
            )
        if len(set(archs)) != len(archs):
            raise ValueError(f"archs lists a network twice: {archs}")
        extra = sorted(set(arch_kwargs or {}) - set(archs))
        if extra:
            raise ValueError(f"arch_kwargs names networks that are not evaluated: {', '.join(extra)} (archs: {archs})")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end), got {every_n_steps!r}")
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be positive, got {epochs}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.protocol = get_protocol(protocol).name  # raises on unknown names, before any training starts
        self.archs = archs
        self.every_n_steps = every_n_steps
        self.repeats = repeats
        self.split = split
        self.epochs, self.steps = epochs, steps
        self.arch_kwargs = {k: dict(v) for k, v in (arch_kwargs or {}).items()}
        self.at_end = at_end
        self.flip = flip
        self.seed = seed
        self.device = device
        self.progress = progress
        #: One dict per (step, architecture): step, arch, protocol, split, seed, mean, std, accuracies.
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        # Two instances (say one per protocol) must not overwrite each other's history in a checkpoint.
        return self._generate_state_key(protocol=self.protocol, archs=self.archs, split=self.split)

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Fail at the start of a run, not after hours of distillation.
        dm = trainer.datamodule
        x = getattr(dm, f"x_{self.split}", None)
        if x is None or len(x) == 0:
            hint = "give the DataModule a validation split (val_size > 0)" if self.split == "val" else ""
            raise ValueError(
                f"CrossArchitectureEval(split={self.split!r}) needs a DataModule with a non-empty "
                f"x_{self.split}/y_{self.split} after setup (a RealDataModule such as MNISTDataModule)"
                + (f": {hint}" if hint else "")
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Evaluate the current set now (all ranks must call it); returns the new history entries."""
        step = int(trainer.global_step)
        entries: list[dict[str, Any]] | None = None
        if trainer.is_global_zero:
            entries = self._run(trainer, pl_module, step)
        # The broadcast keeps the ranks in step (as a barrier would) and gives every rank the same history and
        # callback metrics, so a ModelCheckpoint monitoring them decides alike everywhere.
        entries = trainer.strategy.broadcast(entries, src=0)
        self.history.extend(entries)
        self._last_step = step
        for e in entries:
            metrics = {f"eval/{e['arch']}/acc": e["mean"], f"eval/{e['arch']}/acc_std": e["std"]}
            for key, value in metrics.items():
                trainer.callback_metrics[key] = torch.tensor(value)
        return entries

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> list[dict[str, Any]]:
        dm = trainer.datamodule
        x_eval, y_eval = getattr(dm, f"x_{self.split}"), getattr(dm, f"y_{self.split}")
        device = torch.device(self.device) if self.device is not None else pl_module.device
        flip = self.flip
        if flip is None:
            dataset = pl_module.data_info.get("dataset") if hasattr(pl_module, "data_info") else None
            flip = (dataset or getattr(dm, "name", "")) not in NO_FLIP_DATASETS
        # Record every submodule's mode: restoring with pl_module.train() would also flip submodules that were
        # deliberately in eval mode (frozen teachers).
        modes = {m: m.training for m in pl_module.modules()}
        entries: list[dict[str, Any]] = []
        # train_on_distilled seeds its own networks; the fork also guards against layers (dropout) or augmentations
        # that draw from the global generator, so the distillation run's randomness is the same with or without us.
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                # The method's view of the set (an EMA of it when one runs), a detached copy: the set keeps learning
                # meanwhile, and its autograd graph is never touched.
                view = pl_module.distilled_view()
                images, labels = view.images, view.labels
                for arch in self.archs:
                    entries.append(self._eval_arch(trainer, arch, images, labels, x_eval, y_eval, flip, device, step))
        finally:
            for m, mode in modes.items():
                m.training = mode
        return entries

    def _eval_arch(
        self,
        trainer: L.Trainer,
        arch: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        x_eval: torch.Tensor,
        y_eval: torch.Tensor,
        flip: bool,
        device: torch.device,
        step: int,
    ) -> dict[str, Any]:
        seed = self.seed + step
        result = train_on_distilled(
            images,
            labels,
            x_eval,
            y_eval,
            protocol=self.protocol,
            arch=arch,
            repeats=self.repeats,
            num_classes=int(trainer.lightning_module.synthetic.num_classes),
            flip=flip,
            epochs=self.epochs,
            steps=self.steps,
            seed=seed,
            device=device,
            progress=self.progress,
            arch_kwargs=self.arch_kwargs.get(arch),
        )
        # Log each architecture as soon as it is done, so a long evaluation shows progress in the logger.
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{arch}/acc": result.mean, f"eval/{arch}/acc_std": result.std}, step=step)
        rank_zero_info(f"step {step}, {self.split} split: {result}")
        return {
            "step": step,
            "arch": arch,
            "protocol": self.protocol,
            "split": self.split,
            "seed": seed,
            "mean": result.mean,
            "std": result.std,
            "accuracies": [float(a) for a in result.accuracies],
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(list(state_dict.get("history", [])))
        self._last_step = state_dict.get("last_step")
