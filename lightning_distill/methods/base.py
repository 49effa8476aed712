"""``DistillationMethod``: the manual-optimisation template every method fills in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_distill.precision import NetworkPrecision, PrecisionMode, PrecisionPolicy
from lightning_distill.synthetic.base import DistilledView, SyntheticSet


@dataclass
class MetaStep:
    """What :meth:`DistillationMethod.outer_loss` returns: a loss to back-propagate, or ready gradients.

    Give exactly one of ``loss`` and ``grads``:

    * ``loss``: a scalar the base class back-propagates into the meta-parameters (FRePo);
    * ``grads``: gradients the method computed itself (implicit gradients, a hand-written reverse pass, chunked
      accumulation), keyed by meta-parameter name as :meth:`DistillationMethod.named_meta_parameters` gives them
      (``synthetic.images``, ``synthetic.labels``, a method's own such as ``log_temperature``). A parameter left out
      gets no gradient this step.

    Attributes:
        loss: the scalar to back-propagate (``None`` with ``grads``).
        logs: further values to log this step.
        grads: ready gradients by meta-parameter name (``None`` with ``loss``).
        value: the outer objective's value to log as ``train/outer_loss`` (defaults to ``loss``; with ``grads`` give
            it, or nothing is logged as the outer loss).
    """

    loss: Tensor | None = None
    logs: dict[str, float | Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] | None = None
    value: Tensor | float | None = None

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.grads is None):
            raise ValueError("a MetaStep holds either a loss to back-propagate or ready gradients (grads), not both")

    @property
    def logged_value(self) -> Tensor | float | None:
        """What is logged as the outer loss."""
        if self.value is not None:
            return self.value.detach() if isinstance(self.value, Tensor) else self.value
        return None if self.loss is None else self.loss.detach()


class NonFiniteMetaStep(RuntimeError):
    """Too many outer steps in a row had a non-finite loss or meta-gradient (see ``max_consecutive_skips``)."""


class DistillationMethod(L.LightningModule):
    """Base of every distillation method.

    One ``training_step`` is one outer (meta) update: the synthetic set is materialised, the method's
    :meth:`outer_loss` runs the inner solve as a differentiable sub-routine and returns a loss or ready gradients
    (:class:`MetaStep`), :meth:`before_meta_update` may clip them, the meta-optimiser steps, and
    :meth:`after_outer_step` updates the method's own networks (model pools, students). Inner networks must be held
    functionally (parameter dicts), never as registered submodules, so that DDP only ever sees the meta-parameters.

    **Meta-parameters** come in named groups (:meth:`meta_parameter_groups`): the synthetic set's own groups
    (``images``, ``labels``; see :meth:`SyntheticSet.parameter_groups`) plus any a method adds (RCIG's
    temperature), each with its own optimiser settings. They are ``nn.Parameter`` s of this module, so Lightning
    checkpoints them, and every one of them is finite-checked: a step whose loss or gradients are not finite is
    skipped (counted in ``train/skipped_steps``), so no NaN ever reaches them.

    **One view of the distilled set**: export, image logging, evaluation callbacks and benchmarks read the set
    through :meth:`distilled_view`, so an average of the set (Lightning's ``EMAWeightAveraging`` added by recipe),
    teacher-logit labels or a factorised memory change what they see in one place. The set is built and initialised
    in :meth:`configure_model`, which Lightning's weight-averaging callbacks call before they copy the module.

    Args:
        synthetic: the learnable synthetic set (any :class:`SyntheticSet`; shapes are taken from the data).
        syn_optimizer: optimiser factory for the meta-parameter groups (it receives a list of torch param-group
            dicts); ``None`` uses the method's :meth:`default_optimizer`.
        syn_scheduler: learning-rate scheduler factory, stepped once per outer step; ``None`` uses the method's
            :meth:`default_scheduler` (none for the base class). A scheduler with ``set_horizon`` (e.g.
            :class:`~lightning_distill.optim.CosineDecay` without ``total_steps``) gets ``trainer.max_steps``.
        group_options: optimiser settings per meta-parameter group, over the method's own, e.g.
            ``{"labels": {"lr": 1e-3}}``.
        augment: optional differentiable augmentation (e.g. :class:`~lightning_distill.augment.DSA`).
        max_consecutive_skips: stop the run with :class:`NonFiniteMetaStep` after this many outer steps in a row
            whose loss or meta-gradient was not finite, instead of spinning on an unchanged set (0: never stop).
        seed: seeds the method's own randomness (initialisation, augmentation, pools), the same on every DDP rank so
            that the set and the method's networks stay replicated; the real batches differ by rank.
        precision: precision of the method's network passes (:mod:`lightning_distill.precision`): ``fp32``,
            ``bf16`` (autocast + channels-last), or ``auto`` (bf16 where the device has fast bf16, checked by a
            measurement at start-up); ``None`` (the default) means ``$LIGHTNING_DISTILL_PRECISION``, else
            ``auto``. Kernel matrices, solves and gradient accumulations stay float32/float64 whatever it says.
            Resolved once per device (rank 0 decides under DDP), logged at fit start and recorded as
            ``precision_requested`` and ``precision_resolved`` in :meth:`config`.
    """

    #: Whether the method learns the synthetic set (the random baseline does not).
    learns: bool = True
    #: Whether ``training_step`` materialises the whole set for :meth:`outer_loss`; a method that samples subsets
    #: itself (``self.synthetic(index)``) sets this to ``False`` and receives ``x_syn = y_syn = None``.
    materialise_set: bool = True

    def __init__(
        self,
        synthetic: SyntheticSet,
        syn_optimizer: OptimizerCallable | None = None,
        syn_scheduler: LRSchedulerCallable | None = None,
        group_options: dict[str, dict[str, Any]] | None = None,
        augment: nn.Module | None = None,
        max_consecutive_skips: int = 20,
        seed: int = 0,
        precision: PrecisionMode | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or (max_consecutive_skips < 0)
        ):
            raise ValueError(f"max_consecutive_skips must be a non-negative integer, got {max_consecutive_skips!r}")
        # Collects the init arguments of the whole subclass chain; modules and callables are recorded apart.
        self.save_hyperparameters(ignore=["synthetic", "syn_optimizer", "syn_scheduler", "augment"])
        self.automatic_optimization = False
        self.synthetic = synthetic
        self.syn_optimizer = syn_optimizer
        self.syn_scheduler = syn_scheduler
        self.group_options = {str(k): dict(v) for k, v in (group_options or {}).items()}
        self.augment = augment
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.data_info: dict[str, Any] = {}
        self.skipped_steps = 0
        self.horizon: dict[str, Any] | None = None  # set by set_horizon (a time budget); else max_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self._set_ready = False
        self.precision_policy = PrecisionPolicy(precision)  # validates the mode before anything is built
        self._network_precision: NetworkPrecision | None = None

    # ----------------------------------------------------------------------------------------------- hooks
    def outer_loss(self, x_syn: Tensor | None, y_syn: Tensor | None, x_real: Tensor, y_real: Tensor) -> MetaStep | None:
        """The meta-objective on one real batch; ``None`` means there is nothing to learn this step."""
        raise NotImplementedError

    def before_meta_update(self, params: dict[str, nn.Parameter]) -> dict[str, float | Tensor]:
        """Between the (finite) gradients and the optimiser step: clip ``p.grad`` in place here; returns logs.

        Args:
            params: the meta-parameters that received a gradient this step, by name.
        """
        return {}

    def after_outer_step(self, x_real: Tensor, y_real: Tensor) -> dict[str, float | Tensor]:
        """Work after the synthetic update (model pools, students); returns values to log."""
        return {}

    def setup_method(self, datamodule: L.LightningDataModule) -> None:
        """Build the method's own state (pools, teachers) once the data and the synthetic set exist."""

    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimiser used when no ``syn_optimizer`` is given (Adam 1e-3)."""
        return torch.optim.Adam(groups, lr=1e-3)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        """The learning-rate schedule used when no ``syn_scheduler`` is given (none)."""
        return None

    def meta_parameter_groups(self) -> list[dict[str, Any]]:
        """Named groups of meta-parameters as torch param-group dicts: ``{"name", "params", **options}``.

        The default is the synthetic set's groups. A method with meta-parameters of its own extends the list
        (``super().meta_parameter_groups() + [{"name": "temperature", "params": [self.log_temperature], "lr": ...}]``);
        the recipe's ``group_options`` are applied over these.
        """
        return [{"name": name, "params": list(ps)} for name, ps in self.synthetic.parameter_groups().items() if ps]

    def named_meta_parameters(self) -> dict[str, nn.Parameter]:
        """Every meta-parameter by its module name (``synthetic.images``, ...): the keys of ``MetaStep.grads``."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------------------- the view
    def distilled_view(self) -> DistilledView:
        """The distilled set as everything outside the method sees it (detached; see :class:`DistilledView`).

        When a Lightning weight-averaging callback (``EMAWeightAveraging``, ``StochasticWeightAveraging``-style
        ``WeightAveraging``) runs, this is its averaged copy of the set; otherwise the live set. Methods override
        this to change what is exported (e.g. labels that are a teacher's logits on the final images).
        """
        averaged = self._averaged_synthetic()
        if averaged is not None:
            return averaged.view(source="average")
        return self.synthetic.view()

    def _averaged_synthetic(self) -> SyntheticSet | None:
        if self._trainer is None:
            return None
        from lightning.pytorch.callbacks import WeightAveraging

        for cb in self.trainer.callbacks:
            model = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
            if model is not None and isinstance(getattr(model.module, "synthetic", None), SyntheticSet):
                return model.module.synthetic
        return None

    # ------------------------------------------------------------------------------------------ lifecycle
    def configure_model(self) -> None:
        """Build the synthetic set from the DataModule's shapes and initialise it from real data (once).

        Lightning calls this before training; weight-averaging callbacks call it earlier, from their ``setup``, so
        that their copy of the module holds the built set. A checkpoint restore overwrites the values afterwards.
        """
        if self._set_ready or self._trainer is None:
            # Without a trainer (load_from_checkpoint calls this hook too) the checkpoint builds and fills the set.
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "x_train"):
            raise RuntimeError(
                f"{type(self).__name__} needs a RealDataModule (e.g. MNISTDataModule) passed as "
                "trainer.fit(method, datamodule=...), so that it can initialise the synthetic set from real data"
            )
        if getattr(dm, "x_train", None) is None:
            dm.setup("fit")
        # The same on every rank: under DDP the set, the pools and every choice made from this generator (pool
        # member, online batch) stay replicated; only the real batches differ (the DataModule offsets its stream).
        self.generator.manual_seed(self.seed)
        # Checked before anything is allocated: a set that cannot be filled must not first take gigabytes.
        counts = torch.bincount(dm.y_train.cpu(), minlength=dm.num_classes)[: dm.num_classes]
        names = [str(c) for c in getattr(dm, "class_names", None) or range(dm.num_classes)]
        empty = [f"{c} ({names[c]})" for c in range(dm.num_classes) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"class {', '.join(empty)} has no training images in {getattr(dm, 'name', type(dm).__name__)}: "
                "add images to it or remove the class (an ImageFolder class is a sub-folder of train/)"
            )
        self.synthetic.check_data(counts.tolist(), names)
        self.synthetic.build(dm.num_classes, dm.image_shape)
        self.synthetic.to(self.device)
        self.synthetic.initialise(dm.x_train, dm.y_train, self.generator)
        self.data_info = describe_datamodule(dm)
        self._set_ready = True

    @property
    def network_precision(self) -> NetworkPrecision:
        """The precision policy resolved on the method's device (at the first use: ``setup``, or a benchmark's)."""
        if self._network_precision is None or self._network_precision.device_type != self.device.type:
            self._network_precision = self.precision_policy.bind(self.device)
        return self._network_precision

    def _agree_on_precision(self) -> None:
        # Under DDP every rank must run the same precision, or the replicated pools would drift apart: a noisy
        # start-up measurement must not split the ranks, so rank 0's resolution is broadcast.
        resolved = self.network_precision
        if self._trainer is not None and self.trainer.world_size > 1:
            chosen = self.trainer.strategy.broadcast(resolved.to_dict(), src=0)
            self._network_precision = NetworkPrecision(
                chosen["resolved"], resolved.device_type, chosen["requested"], chosen["reason"]
            )

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self.configure_model()
        self._agree_on_precision()
        self.setup_method(self.trainer.datamodule)

    def on_fit_start(self) -> None:
        p = self.network_precision
        rank_zero_info(f"{type(self).__name__}: network passes in {p.dtype} ({p.reason})")
        # Straight to the loggers (rank zero only), once: self.log would repeat a value logged in one step only.
        for logger in self.loggers:
            logger.log_metrics({"train/precision_bf16": float(p.bf16)}, step=self.global_step)

    def configure_optimizers(self) -> Any:
        groups = self.optimizer_groups()
        if not groups:
            return None
        opt = self.syn_optimizer(groups) if self.syn_optimizer is not None else self.default_optimizer(groups)
        sched = self.syn_scheduler(opt) if self.syn_scheduler is not None else self.default_scheduler(opt)
        if sched is None:
            return opt
        if hasattr(sched, "set_horizon"):
            sched.set_horizon(self.trainer.max_steps if self._trainer is not None else None)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def set_horizon(self, total_steps: int, source: str = "max_steps") -> None:
        """Give every schedule that takes its length from the run a new horizon (and record it for the export).

        :class:`~lightning_distill.callbacks.TimeBudget` calls this once it has measured the step time; a method
        whose own work depends on the horizon (a decay point, a reset period) extends it.

        Args:
            total_steps: the run's outer steps.
            source: how it was chosen, recorded in exports (``"max_steps"``, ``"time budget: ..."``).
        """
        self.horizon = {"steps": int(total_steps), "source": source}
        if self._trainer is None:
            return
        scheds = self.lr_schedulers()
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            if sched is not None and hasattr(sched, "set_horizon"):
                sched.set_horizon(int(total_steps))

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The torch param groups the meta-optimiser receives: :meth:`meta_parameter_groups` with ``group_options``.

        Raises:
            ValueError: on duplicate group names, options for a group that does not exist, or a trainable parameter
                that no group holds (it would silently stay fixed).
        """
        groups = [dict(g) for g in self.meta_parameter_groups()]
        names = [g["name"] for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"meta-parameter group names must be unique, got {names}")
        unknown = sorted(set(self.group_options) - set(names))
        if unknown:
            raise ValueError(
                f"group_options names groups this method does not have: {', '.join(unknown)}; "
                f"its groups are {', '.join(names) or '(none)'}"
            )
        for g in groups:
            g.update(self.group_options.get(g["name"], {}))
        # Every trainable tensor must be optimised by exactly one group: a forgotten one would silently stay fixed.
        grouped = [id(p) for g in groups for p in g["params"]]
        if len(set(grouped)) != len(grouped):
            raise ValueError("a meta-parameter appears in more than one group")
        missing = [n for n, p in self.named_meta_parameters().items() if id(p) not in set(grouped)]
        if missing:
            raise ValueError(
                f"{type(self).__name__} has trainable parameters in no meta-parameter group: {', '.join(missing)}; "
                "add them in meta_parameter_groups() or set requires_grad=False"
            )
        return groups

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x_real, y_real = batch
        x_syn, y_syn = self.synthetic() if self.materialise_set else (None, None)
        step = self.outer_loss(x_syn, y_syn, x_real, y_real)
        logs: dict[str, float | Tensor] = {}
        if step is not None:
            logs.update(step.logs)
            logs.update(self.apply_meta_step(step))
        else:
            self._null_step()
        logs.update(self.after_outer_step(x_real, y_real))
        logs["train/skipped_steps"] = float(self.skipped_steps)
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x_real))
        value = None if step is None else step.logged_value
        if value is not None:
            self.log("loss", value, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(x_real))

    def _null_step(self) -> None:
        # Nothing to learn (or a refused step): an optimiser step without gradients changes nothing but still counts
        # the outer step, which is how Lightning's manual optimisation advances global_step (and reaches max_steps).
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()

    def apply_meta_step(self, step: MetaStep) -> dict[str, float | Tensor]:
        """Put the step's gradients on the meta-parameters, refuse non-finite ones, clip, and step the optimiser.

        Returns the values to log (``train/outer_loss``, ``train/grad_norm_<group>``).
        """
        opt = self.optimizers()
        value = step.logged_value
        logs: dict[str, float | Tensor] = {} if value is None else {"train/outer_loss": value}
        opt.zero_grad(set_to_none=True)
        if step.loss is not None:
            if not torch.isfinite(step.loss):
                self._skip("loss")
                return {}
            self.manual_backward(step.loss)
        else:
            self._assign_grads(step.grads)
        named = {n: p for n, p in self.named_meta_parameters().items() if p.grad is not None}
        norms = {n: p.grad.detach().norm() for n, p in named.items()}
        if not all(torch.isfinite(v) for v in norms.values()):
            # A non-finite gradient must never reach the set: drop the gradients, count the skip. The step without
            # gradients leaves the set unchanged but keeps global_step counting outer steps.
            self._skip("meta-gradient")
            return logs
        self.consecutive_skips = 0
        logs.update(self.before_meta_update(named))
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        for n, v in norms.items():
            logs[f"train/grad_norm_{_short(n)}"] = v
        return logs

    def _skip(self, what: str) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self._null_step()
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            step = int(self.trainer.global_step) if self._trainer is not None else None
            raise NonFiniteMetaStep(
                f"{self.consecutive_skips} outer steps in a row had a non-finite {what} (up to step {step}); the set "
                f"is unchanged since step {None if step is None else step - self.consecutive_skips}: lower the "
                "learning rate, check the data for NaN/Inf, or raise max_consecutive_skips"
            )

    def _assign_grads(self, grads: dict[str, Tensor]) -> None:
        params = self.named_meta_parameters()
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise KeyError(
                f"MetaStep.grads names no meta-parameter of {type(self).__name__}: {', '.join(unknown)}; "
                f"known: {', '.join(params)}"
            )
        world = self.trainer.world_size if self._trainer is not None else 1
        for name, g in grads.items():
            p = params[name]
            if g.shape != p.shape:
                raise ValueError(f"gradient for {name} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
            g = g.detach().to(p)
            if world > 1:
                # Autograd's DDP hooks never see hand-made gradients: average them over the ranks here, as DDP would.
                g = self.trainer.strategy.reduce(g, reduce_op="mean")
            p.grad = g.clone()

    # --------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_distill"] = {
            "synthetic_shape": (self.synthetic.num_classes, self.synthetic.image_shape),
            "generator": self.generator.get_state(),
            "data_info": self.data_info,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
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
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.load_method_state_dict(state["method_state"])

    def method_state_dict(self) -> dict[str, Any]:
        """State of the method's functional networks (pools, students) for checkpoints."""
        return {}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state_dict` returned."""

    # -------------------------------------------------------------------------------------------- export
    def export_payload(self) -> dict[str, Any]:
        """The distilled set (:meth:`distilled_view`) in the export format, a CPU snapshot with its metadata."""
        from lightning_distill.export import build_export

        step = int(self.trainer.global_step) if self._trainer is not None else None
        return build_export(
            self.distilled_view(), self.synthetic, self.data_info, type(self).__name__, self.config(), self.seed, step
        )

    def config(self) -> dict[str, Any]:
        """The method's configuration, recorded in exports (plain values only)."""
        hp = {k: _plain(v) for k, v in self.hparams.items()}
        hp["synthetic"] = {"class": type(self.synthetic).__name__, "repr": self.synthetic.extra_repr()}
        hp["precision_requested"] = self.precision_policy.mode
        hp["precision_resolved"] = self.network_precision.dtype
        horizon = self.horizon
        if horizon is None and self._trainer is not None and self.trainer.max_steps > 0:
            horizon = {"steps": int(self.trainer.max_steps), "source": "max_steps"}
        hp["horizon"] = horizon
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
        # The real images the set was built from, as indices into the raw training split (membership inference).
        **({"members": dm.member_indices.tolist()} if getattr(dm, "member_indices", None) is not None else {}),
    }


def _short(name: str) -> str:
    # synthetic.images -> x, synthetic.labels -> y (the names the logs have always used); others keep their path.
    short = {"synthetic.images": "x", "synthetic.labels": "y"}.get(name)
    return short or name.removeprefix("synthetic.").replace(".", "_")


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
