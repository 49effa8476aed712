"""FRePo: dataset distillation by neural feature regression with a model pool.

Zhou, Nezhadarya, Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022
(official code: github.com/yongchaoz/FRePo, JAX; re-implemented here from the paper's description).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_distill.components.model_pool import ModelPool
from lightning_distill.functional.kernels import krr_predict
from lightning_distill.functional.losses import centred_one_hot, half_mse, label_margin_loss
from lightning_distill.methods.base import DistillationMethod, MetaStep
from lightning_distill.nets import get_net
from lightning_distill.optim import LAMB, CosineDecay
from lightning_distill.precision import PrecisionMode
from lightning_distill.synthetic.base import SyntheticSet


class FRePo(DistillationMethod):
    """Neural feature regression (FRePo), one outer step per ``training_step``.

    Each step takes the current pool model's features of the real batch (no gradient) and of the synthetic set
    (with gradient), solves kernel ridge regression on the linear feature kernel with the trace-relative ridge
    ``ridge * tr(K)/M``, predicts the real labels (centred one-hot), and minimises ``½‖Ŷ - Y‖²`` (plus the
    label-margin term when labels are learned). Then the current pool model takes one Adam step on the synthetic
    set, and the next pool model is drawn. With ``members_per_step`` above 1 the step draws that many distinct pool
    models, averages their regression losses (the label-margin term is added once), and each of them takes its online
    step.

    Args:
        synthetic: the synthetic set (any parameterisation; FRePo learns labels with ``PixelSet(labels="learned",
            label_scale=1/sqrt(C/10))``).
        arch: pool network (registry name); FRePo uses ``convnet_frepo`` (doubling widths, BatchNorm before conv).
        arch_kwargs: options of the pool network (e.g. ``width``, ``depth``).
        pool_size: number of online models (FRePo: 10).
        members_per_step: distinct pool models whose mean regression loss each outer step minimises (FRePo: 1). Each
            member adds a feature pass of the real batch and of the synthetic set (whose graph the backward pass
            keeps) and an online step; in return the meta-gradient averages over that many pool models.
        max_online_steps: a model is re-initialised after this many online steps (FRePo: 100).
        online_lr: Adam learning rate of the online models (FRePo: 3e-4).
        online_batch: at most this many synthetic images per online step (FRePo: 1000).
        ridge: relative ridge of the kernel regression (FRePo: 1e-6).
        use_flip: add horizontally flipped copies of the synthetic images to the regression support set.
        syn_optimizer: the outer optimiser factory; ``None`` is FRePo's: :class:`~lightning_distill.optim.LAMB` at
            3e-4 (per-tensor trust ratio). A recipe writes ``{class_path: lightning_distill.optim.LAMB, init_args:
            {lr: 0.003}}`` (or any torch optimiser).
        syn_scheduler: the outer schedule; ``None`` is FRePo's: :class:`~lightning_distill.optim.CosineDecay` to 0.1x
            the initial rate over ``trainer.max_steps`` (give ``total_steps`` to fix the horizon instead).
        group_options: optimiser settings per meta-parameter group (``images``, ``labels``), e.g.
            ``{"labels": {"lr": 1e-3}}``.
        max_consecutive_skips: stop after this many non-finite outer steps in a row (0: never).
        seed: seeds initialisation, the pool and the pool-model choice.
        precision: precision of the pool's network passes (real and synthetic features, online steps): ``fp32``,
            ``bf16``, ``auto``, or ``None`` for ``$LIGHTNING_DISTILL_PRECISION`` else ``auto`` (see
            :class:`~lightning_distill.methods.base.DistillationMethod`); the kernel
            regression is solved in float32 (float64 on fallback) whatever it says.
        compile_features: run the pool's feature passes (real batch and synthetic set) through ``torch.compile``
            (see :class:`~lightning_distill.components.ModelPool`); off by default: it costs tens of seconds of
            compiling at start-up and pays 1.2-1.4x on those passes on a CPU
            (``benchmarks/results/compile_trial_cpu.md``).
    """

    def __init__(
        self,
        synthetic: SyntheticSet,
        arch: str = "convnet_frepo",
        arch_kwargs: dict[str, Any] | None = None,
        pool_size: int = 10,
        members_per_step: int = 1,
        max_online_steps: int = 100,
        online_lr: float = 3e-4,
        online_batch: int = 1000,
        ridge: float = 1e-6,
        use_flip: bool = False,
        syn_optimizer: OptimizerCallable | None = None,
        syn_scheduler: LRSchedulerCallable | None = None,
        group_options: dict[str, dict[str, Any]] | None = None,
        max_consecutive_skips: int = 20,
        seed: int = 0,
        precision: PrecisionMode | None = None,
        compile_features: bool = False,
    ) -> None:
        super().__init__(
            synthetic=synthetic,
            syn_optimizer=syn_optimizer,
            syn_scheduler=syn_scheduler,
            group_options=group_options,
            max_consecutive_skips=max_consecutive_skips,
            seed=seed,
            precision=precision,
        )
        if pool_size < 1 or max_online_steps < 1 or online_batch < 1:
            raise ValueError("pool_size, max_online_steps and online_batch must be positive")
        if not 1 <= members_per_step <= pool_size:
            raise ValueError(
                f"members_per_step must be between 1 and pool_size ({pool_size}), got {members_per_step}: a step "
                "draws that many distinct pool models"
            )
        if ridge < 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}")
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        self.pool_size, self.members_per_step, self.max_online_steps = pool_size, members_per_step, max_online_steps
        self.online_lr, self.online_batch = online_lr, online_batch
        self.ridge, self.use_flip = ridge, use_flip
        self.compile_features = compile_features
        self.pool: ModelPool | None = None
        self.pool_members: list[int] = [0]  # the pool models the next outer step regresses on
        self.solver_fallbacks = 0

    # ------------------------------------------------------------------------------------------ set-up
    def setup_method(self, datamodule: Any) -> None:
        c, h, _ = self.synthetic.image_shape
        k = self.synthetic.num_classes

        def factory() -> torch.nn.Module:
            return get_net(self.arch, c, k, h, **self.arch_kwargs)

        self.pool = ModelPool(
            factory,
            size=self.pool_size,
            max_online_steps=self.max_online_steps,
            lr=self.online_lr,
            seed=self.seed,
            precision=self.network_precision,
            compile_features=self.compile_features,
        ).to(self.device)
        self.pool_members = self.pool.select_many(self.generator, self.members_per_step)

    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """FRePo's outer optimiser: LAMB at the paper's 3e-4."""
        return LAMB(groups, lr=3e-4)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> CosineDecay:
        """FRePo's schedule: cosine decay to 0.1x over the run's ``max_steps``."""
        return CosineDecay(optimizer, total_steps=None, final_ratio=0.1)

    # ------------------------------------------------------------------------------------- outer step
    def targets(self, y_syn: Tensor) -> Tensor:
        """Regression targets of the synthetic set: learned/soft labels as they are, hard ones as centred one-hot."""
        return y_syn if y_syn.ndim == 2 else centred_one_hot(y_syn, self.synthetic.num_classes)

    def outer_loss(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaStep:
        k = self.synthetic.num_classes
        y_sup = self.targets(y_syn)
        x_sup = x_syn
        if self.use_flip:
            # The flip trick: mirrored copies join the regression support set (not an augmentation).
            x_sup = torch.cat([x_syn, torch.flip(x_syn, dims=[-1])])
            y_sup = torch.cat([y_sup, y_sup])
        y_t = centred_one_hot(y_real, k)
        losses, accs = [], []
        for idx in self.pool_members:
            with torch.no_grad():
                feat_t = self.pool.features(idx, x_real)
            feat_s = self.pool.features(idx, x_sup)
            try:
                pred, info = krr_predict(feat_s, y_sup, feat_t, ridge=self.ridge, relative=True, return_info=True)
            except torch.linalg.LinAlgError:
                # Non-finite features or an unsolvable system: the base class skips a non-finite loss and counts it.
                return MetaStep(torch.full((), float("nan"), device=x_syn.device), {})
            if info["fallback"]:
                self.solver_fallbacks += 1
            losses.append(half_mse(pred, y_t.to(pred.dtype)))
            accs.append((pred.argmax(1) == y_real).float().mean())
        krr_loss = torch.stack(losses).mean()
        loss = krr_loss
        logs: dict[str, float | Tensor] = {
            "train/krr_loss": krr_loss.detach(),
            "train/krr_acc": torch.stack(accs).mean().detach(),
            "train/solver_fallbacks": float(self.solver_fallbacks),
        }
        if self.synthetic.label_kind == "learned":
            margin = label_margin_loss(y_syn, 1.0 / k)
            loss = loss + margin
            logs["train/label_margin"] = margin.detach()
        return MetaStep(loss, logs)

    def after_outer_step(self, x_real: Tensor, y_real: Tensor) -> dict[str, float | Tensor]:
        with torch.no_grad():
            x_syn, y_syn = self.synthetic()
            x_syn, y_t = x_syn.detach(), self.targets(y_syn).detach()
        if len(x_syn) > self.online_batch:
            pick = torch.randperm(len(x_syn), generator=self.generator)[: self.online_batch].to(x_syn.device)
            x_syn, y_t = x_syn[pick], y_t[pick]
        # Each member the step used takes its online step; None is a member that was re-initialised instead.
        online = [self.pool.train_step(idx, x_syn, y_t) for idx in self.pool_members]
        self.pool_members = self.pool.select_many(self.generator, self.members_per_step)
        trained = [loss for loss in online if loss is not None]
        return {"train/online_loss": sum(trained) / len(trained)} if trained else {}

    # ------------------------------------------------------------------------------------ checkpoints
    def method_state_dict(self) -> dict[str, Any]:
        if self.pool is None:
            return {}
        members = list(self.pool_members)
        return {"pool": self.pool.state_dict(), "pool_members": members, "fallbacks": self.solver_fallbacks}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._pending_pool_state = state
        if self.pool is not None:
            self._restore_pool()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if getattr(self, "_pending_pool_state", None) is not None:
            self._restore_pool()

    def _restore_pool(self) -> None:
        state = self._pending_pool_state
        self.pool.load_state_dict(state["pool"])
        self.pool.to(self.device)
        self.pool.precision = self.network_precision  # resolved for the device the pool now computes on
        # Checkpoints made before members_per_step stored one index as "pool_index".
        members = state["pool_members"] if "pool_members" in state else [state["pool_index"]]
        if len(members) != self.members_per_step:
            raise ValueError(
                f"the checkpoint's FRePo drew {len(members)} pool member(s) per step and this one "
                f"{self.members_per_step}: resume with --model.init_args.members_per_step={len(members)}"
            )
        self.pool_members, self.solver_fallbacks = [int(i) for i in members], state["fallbacks"]
        self._pending_pool_state = None
