"""RCIG: dataset distillation with reparameterised, convexified implicit gradients.

Loo, Hasani, Lechner, Rus, "Dataset Distillation with Convexified Implicit Gradients", ICML 2023 (official code:
github.com/yolky/RCIG, JAX; re-implemented here from the paper's description, see
shared/reference/methods_frepo_rcig.md §3 and §6). The maths is in :mod:`lightning_distill.functional.rcig`; this
module holds the state: the pool, the learned temperature, the solver learning rates and their tuning.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_distill.components.ema import ParameterEMA
from lightning_distill.components.model_pool import ModelPool
from lightning_distill.functional.losses import centred_one_hot
from lightning_distill.functional.rcig import MetaGradient, SolverSettings, inner_system, meta_gradient, support_set
from lightning_distill.methods.base import DistillationMethod, MetaStep
from lightning_distill.nets import get_net
from lightning_distill.precision import PrecisionMode
from lightning_distill.runtime import flush_denormals
from lightning_distill.synthetic.base import DistilledView, SyntheticSet

__all__ = ["RCIG", "mean_half_mse", "tune_lr"]

Solver = Literal["adam", "cg"]


def mean_half_mse(logits: Tensor, target: Tensor) -> Tensor:
    """RCIG's pool loss ``Σ ½(f − Ỹ)² / (M·C)`` (a mean over every output, not per image)."""
    return 0.5 * (logits - target).pow(2).mean()


def tune_lr(run, lr: float, grow: float = 1.2, shrink: float = 0.7, max_tries: int = 120) -> tuple[float, int]:
    """RCIG's learning-rate search: grow ``lr`` by ``grow`` while ``run(lr)`` is monotone, then take ``shrink``×.

    Args:
        run: ``run(lr) -> bool``: whether a solve at ``lr`` decreased its objective at every step.
        lr: The starting rate (RCIG: 1e-5 for the inner solve, 5e-5 for the inverse-HVP).
        grow, shrink: The factors (RCIG: 1.2 and 0.7).
        max_tries: Stop growing after this many monotone runs (a rate that is never too large).

    Returns:
        ``(tuned rate, runs spent)``.
    """
    tries = 0
    while tries < max_tries and run(lr):
        lr *= grow
        tries += 1
    return lr * shrink, tries + 1


class RCIG(DistillationMethod):
    """RCIG, one outer step per ``training_step`` (implicit meta-gradient of a convexified inner problem).

    Each step takes the current pool model's parameters θ0 and its linearisation in tangent parameters δ (the last
    layer's kernel masked out), eliminates a separate last layer analytically by a ridge solve with the absolute
    ridge ``l2_rate · N``, solves the remaining strongly convex problem for δ* (``inner_steps`` Adam steps from 0),
    differentiates the outer cross-entropy (with a learned log-temperature) on the real batch through the analytic
    last layer, and adds the implicit term ``−∇_S[vᵀ∇_δ L_in]`` with ``v = H⁻¹ ∂L_out/∂δ`` (``hinv_steps`` Adam steps),
    clipped per tensor to the direct term's norm. The set and the temperature then take an AdaBelief step, and the
    pool model trains ``pool_steps`` Adam steps on the synthetic set. The learning rates of both solves are tuned
    before training and the inner one adapted every ``adapt_every`` steps, as the official code does.

    Export, image logging and evaluation see a bias-corrected EMA of the set (``ema_decay``) through
    :meth:`distilled_view`; the EMA (of the set's parameters and the temperature) is checkpointed with the method.

    Args:
        synthetic: the synthetic set (any parameterisation; RCIG learns labels: ``PixelSet(labels="learned")``).
        arch: the pool network (registry name; ``convnet_rcig``: doubling widths, no norm, softplus β=60 at depth 3).
        arch_kwargs: options of the pool network (e.g. ``width``, ``depth``, ``activation``).
        pool_size: models in the pool (RCIG: 30).
        max_online_steps: a pool model is re-initialised once it has taken this many steps (RCIG: 100).
        pool_lr: Adam learning rate of the pool models (RCIG: 5e-5).
        pool_steps: Adam steps per visit, an inclusive range drawn per visit (RCIG: 1..15) or a fixed count.
        pool_park: keep pool models on the CPU between uses (RCIG does; spares accelerator memory for big pools).
        l2_rate: the ridge per support image: ``λ = l2_rate · N`` (RCIG: 5e-4; 0.05 at 128 px).
        use_flip: add mirrored images to the regression support set (the flip trick; RCIG: on for RGB sets).
        inner_steps, inner_lr, inner_solver: the solve for δ* (RCIG: 20 Adam steps; ``inner_lr`` is where the tuning
            starts, 1e-5, or the rate used when ``tune_lr=False``). ``cg`` is conjugate gradient with ``solver_tol``.
        hinv_steps, hinv_lr, hinv_solver: the inverse-HVP solve (RCIG: 20 Adam steps, tuning from 5e-5).
        solver_tol: relative residual at which CG stops.
        tune_lr: tune both solve rates before the first step (RCIG's grow-while-monotone search).
        adapt_every: adapt the inner rate every this many steps (×0.9 if ≥ 29 % of the inner runs ended above
            their start, ×1.05 if ≥ 70 % decreased monotonically); 0 turns it off.
        temperature_lr: learning rate of the log-temperature (RCIG: 3e-2); images and labels take the optimiser's.
        label_margin: keep learned labels' top-2 margin up to ``1/(2C)`` (RCIG's label term).
        clip_implicit: clip the implicit term per tensor to the direct term's norm (RCIG does).
        ema_decay: decay of the bias-corrected EMA that export and evaluation see (RCIG: 0.99); 0 turns it off.
        solve_chunk: pass at most this many support images at a time through the network in the solves (memory only).
        syn_grad_batch: recompute only this many random support images with gradient in the direct pass, the rest
            without (RCIG's subsampling for large sets; ``None``: all).
        real_grad_batch: the same for the real batch's tangent outputs (those that carry the gradient w.r.t. δ).
        jacobian_mb: form the support set's Jacobian once per step for the solves when it takes at most this many
            MiB (40 products become matmuls: about 2x faster at IPC 10 on the CPU recipes); 0: always matrix-free.
            Time and memory only, never the result.
        syn_optimizer: the outer optimiser; ``None`` is RCIG's AdaBelief at 3e-3 (``pytorch_optimizer.AdaBelief``).
        syn_scheduler: the outer schedule (RCIG: none).
        group_options: optimiser settings per meta-parameter group (``images``, ``labels``, ``temperature``).
        max_consecutive_skips: stop after this many non-finite outer steps in a row (0: never).
        seed: seeds initialisation, the pool, the pool-model choice and the subsampling.
        precision: precision of the pool's training passes (``fp32``, ``bf16``, ``auto``; ``None``:
            ``$LIGHTNING_DISTILL_PRECISION``, else ``auto``); the linearised passes,
            solves and implicit products always run in float32 (second-order maths).
    """

    #: ``training_step`` runs with denormals flushed (benchmarks that call the hooks directly do the same).
    flushes_denormals: bool = True

    def __init__(
        self,
        synthetic: SyntheticSet,
        arch: str = "convnet_rcig",
        arch_kwargs: dict[str, Any] | None = None,
        pool_size: int = 30,
        max_online_steps: int = 100,
        pool_lr: float = 5e-5,
        pool_steps: int | tuple[int, int] = (1, 15),
        pool_park: bool = False,
        l2_rate: float = 5e-4,
        use_flip: bool = False,
        inner_steps: int = 20,
        inner_lr: float = 1e-5,
        inner_solver: Solver = "adam",
        hinv_steps: int = 20,
        hinv_lr: float = 5e-5,
        hinv_solver: Solver = "adam",
        solver_tol: float = 1e-6,
        tune_lr: bool = True,
        adapt_every: int = 50,
        temperature_lr: float = 3e-2,
        label_margin: bool = True,
        clip_implicit: bool = True,
        ema_decay: float = 0.99,
        solve_chunk: int | None = None,
        syn_grad_batch: int | None = None,
        real_grad_batch: int | None = None,
        jacobian_mb: float = 1024.0,
        syn_optimizer: OptimizerCallable | None = None,
        syn_scheduler: LRSchedulerCallable | None = None,
        group_options: dict[str, dict[str, Any]] | None = None,
        max_consecutive_skips: int = 20,
        seed: int = 0,
        precision: PrecisionMode | None = None,
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
        for name, value in (("pool_size", pool_size), ("max_online_steps", max_online_steps)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("inner_steps", inner_steps), ("hinv_steps", hinv_steps), ("adapt_every", adapt_every)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("l2_rate", l2_rate), ("inner_lr", inner_lr), ("hinv_lr", hinv_lr)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("inner_solver", inner_solver), ("hinv_solver", hinv_solver)):
            if value not in ("adam", "cg"):
                raise ValueError(f"{name} must be 'adam' or 'cg', got {value!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns the EMA off), got {ema_decay}")
        for name, value in (
            ("solve_chunk", solve_chunk),
            ("syn_grad_batch", syn_grad_batch),
            ("real_grad_batch", real_grad_batch),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null, got {value}")
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        self.pool_size, self.max_online_steps, self.pool_lr = pool_size, max_online_steps, pool_lr
        self.pool_steps = tuple(pool_steps) if isinstance(pool_steps, (list, tuple)) else int(pool_steps)
        self.pool_park = pool_park
        self.l2_rate, self.use_flip = l2_rate, use_flip
        self.inner_steps, self.inner_solver, self.hinv_steps, self.hinv_solver = (
            inner_steps,
            inner_solver,
            hinv_steps,
            hinv_solver,
        )
        self.solver_tol = solver_tol
        self.inner_lr, self.hinv_lr = float(inner_lr), float(hinv_lr)
        self.tune_lr, self.adapt_every = tune_lr, adapt_every
        self.temperature_lr = temperature_lr
        self.label_margin, self.clip_implicit = label_margin, clip_implicit
        self.ema_decay = ema_decay
        self.solve_chunk, self.syn_grad_batch, self.real_grad_batch = solve_chunk, syn_grad_batch, real_grad_batch
        if jacobian_mb < 0:
            raise ValueError(f"jacobian_mb must be >= 0 (0: never form the Jacobian), got {jacobian_mb}")
        self.jacobian_mb = float(jacobian_mb)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.pool: ModelPool | None = None
        self.pool_index = 0
        self.tuned = not tune_lr
        self._runs = self._runs_increased = self._runs_monotone = 0
        self.timings: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self.ema = ParameterEMA(ema_decay) if ema_decay > 0 else None

    # ------------------------------------------------------------------------------------------ set-up
    def setup_method(self, datamodule: Any) -> None:
        c, h, _ = self.synthetic.image_shape
        k = self.synthetic.num_classes

        def factory() -> nn.Module:
            return get_net(self.arch, c, k, h, **self.arch_kwargs)

        self.pool = ModelPool(
            factory,
            size=self.pool_size,
            # ModelPool re-initialises when the count *exceeds* its limit; RCIG once a model has done 100 steps.
            max_online_steps=self.max_online_steps - 1,
            lr=self.pool_lr,
            staggered=False,
            seed=self.seed,
            device=self.device,
            loss_fn=mean_half_mse,
            steps_per_visit=self.pool_steps,
            park_device="cpu" if self.pool_park else None,
            precision=self.network_precision,
        )
        self.pool_index = self.pool.select(self.generator)
        if self._pending_state is not None:
            self._restore_pool()

    def meta_parameter_groups(self) -> list[dict[str, Any]]:
        return super().meta_parameter_groups() + [
            {"name": "temperature", "params": [self.log_temperature], "lr": self.temperature_lr}
        ]

    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """RCIG's outer optimiser: AdaBelief at 3e-3 (optax defaults: β = (0.9, 0.999), ε = 1e-16).

        From ``pytorch-optimizer`` (maintained, tested against the reference implementations) rather than the
        abandoned ``adabelief-pytorch``; ``weight_decouple`` is moot at weight decay 0, ``rectify`` is off as in optax.
        """
        from pytorch_optimizer import AdaBelief

        return AdaBelief(groups, lr=3e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, rectify=False)

    # ------------------------------------------------------------------------------------- outer step
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # softplus(60x)/60 makes denormals by the million; flushing them made the pool network's passes ~2x faster.
        with flush_denormals():
            super().training_step(batch, batch_idx)

    def targets(self, y_syn: Tensor) -> Tensor:
        """Regression targets of the synthetic set: learned/soft labels as they are, hard ones as centred one-hot."""
        return y_syn if y_syn.ndim == 2 else centred_one_hot(y_syn, self.synthetic.num_classes).to(y_syn.device)

    def _network(self) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
        """The current pool model's template, parameters and buffers on the compute device (eval mode)."""
        idx = self.pool_index
        net = self.pool.template.eval()
        params = {k: v.to(self.device) for k, v in self.pool.params(idx).items()}
        buffers = {k: v.to(self.device) for k, v in self.pool.buffers(idx).items()}
        return net, params, buffers

    def solvers(self) -> tuple[SolverSettings, SolverSettings]:
        """The inner and inverse-HVP solves as configured now (the learning rates are tuned and adapted)."""
        return (
            SolverSettings(self.inner_solver, self.inner_steps, self.inner_lr, self.solver_tol),
            SolverSettings(self.hinv_solver, self.hinv_steps, self.hinv_lr, self.solver_tol),
        )

    def ridge(self) -> float:
        """The absolute ridge ``l2_rate · N`` (``N``: synthetic images, flips not counted)."""
        return self.l2_rate * self.synthetic.num_images

    def compute_meta_gradient(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaGradient:
        """The meta-gradient w.r.t. leaf copies of ``(x_syn, targets)`` and the temperature, at the current model."""
        net, params, buffers = self._network()
        inner, hinv = self.solvers()
        learned = y_syn.requires_grad and y_syn.is_floating_point()
        x_leaf = x_syn.detach().requires_grad_(True)
        y_leaf = self.targets(y_syn.detach()).requires_grad_(learned)
        k = self.synthetic.num_classes
        return meta_gradient(
            net,
            params,
            buffers,
            x_leaf,
            y_leaf,
            x_real,
            y_real,
            self.log_temperature,
            self.ridge(),
            inner,
            hinv,
            use_flip=self.use_flip,
            label_margin=1.0 / (2 * k) if self.label_margin else None,
            clip_implicit=self.clip_implicit,
            chunk=self.solve_chunk,
            syn_grad_batch=self.syn_grad_batch,
            real_grad_batch=self.real_grad_batch,
            generator=self.generator,
            jacobian_mb=self.jacobian_mb,
        )

    def outer_loss(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaStep:
        if not self.tuned:
            self.tune(x_syn, y_syn, x_real, y_real)
        try:
            mg = self.compute_meta_gradient(x_syn, y_syn, x_real, y_real)
        except torch.linalg.LinAlgError:
            # Non-finite features or an unsolvable kernel system: the base class skips a non-finite step and counts it.
            return MetaStep(torch.full((), float("nan"), device=x_real.device))
        self._count_inner(mg)
        # Back to the set's own parameters (pixels, or a memory's bases and coefficients) by the chain rule.
        outputs, cotangents = [x_syn], [mg.grads["x_syn"]]
        if mg.grads["y_syn"] is not None:
            outputs.append(y_syn)
            cotangents.append(mg.grads["y_syn"].to(y_syn.dtype))
        named = {f"synthetic.{n}": p for n, p in self.synthetic.named_parameters() if p.requires_grad}
        pgrads = torch.autograd.grad(outputs, list(named.values()), cotangents, allow_unused=True)
        grads = {n: g for n, g in zip(named, pgrads, strict=True) if g is not None}
        grads["log_temperature"] = mg.grads["log_temperature"]
        self.timings = {**mg.timings}
        logs: dict[str, float | Tensor] = {f"train/{k}": v for k, v in mg.logs.items()}
        logs.update({"train/inner_lr": self.inner_lr, "train/hinv_lr": self.hinv_lr})
        return MetaStep(grads=grads, value=mg.loss, logs=logs)

    def _count_inner(self, mg: MetaGradient) -> None:
        if mg.inner is None or self.inner_solver != "adam" or not self.adapt_every:
            return
        self._runs += 1
        self._runs_increased += int(mg.inner.increased)
        self._runs_monotone += int(mg.inner.monotone)

    def _averaged(self) -> dict[str, nn.Parameter]:
        named = {f"synthetic.{n}": p for n, p in self.synthetic.named_parameters()}
        return {**named, "log_temperature": self.log_temperature}

    def distilled_view(self) -> DistilledView:
        """The bias-corrected EMA of the set (RCIG evaluates it); the live set before the first step or without EMA.

        A weight-averaging callback added by the recipe takes precedence (the base class's view).
        """
        if self.ema is None or self.ema.count == 0 or self._averaged_synthetic() is not None:
            return super().distilled_view()
        named = {k: p for k, p in self._averaged().items() if k.startswith("synthetic.")}
        with self.ema.swapped(named):
            return self.synthetic.view(source="average")

    def after_outer_step(self, x_real: Tensor, y_real: Tensor) -> dict[str, float | Tensor]:
        if self.ema is not None:
            self.ema.update(self._averaged())
        t0 = time.perf_counter()
        with torch.no_grad():
            x_syn, y_syn = self.synthetic()
            x_sup, y_sup = support_set(x_syn.detach(), self.targets(y_syn.detach()), self.use_flip)
        pool_loss = self.pool.train_step(self.pool_index, x_sup, y_sup, generator=self.generator)
        self.pool_index = self.pool.select(self.generator)
        self.timings["pool"] = time.perf_counter() - t0
        logs: dict[str, float | Tensor] = {f"train/time_{k}": v for k, v in self.timings.items()}
        if pool_loss is not None:
            logs["train/pool_loss"] = pool_loss
        step = int(self.trainer.global_step) if self._trainer is not None else 0
        if self.adapt_every and step > 0 and step % self.adapt_every == 0 and self._runs:
            self._adapt()
        return logs

    def _adapt(self) -> None:
        """RCIG's inner-rate adaptation: slower if ≥ 29 % of the runs ended above their start, faster if ≥ 70 % were
        monotone (the inverse-HVP rate is never adapted, as in the official code)."""
        if self._runs_increased >= 0.29 * self._runs:
            self.inner_lr *= 0.9
        elif self._runs_monotone >= 0.7 * self._runs:
            self.inner_lr *= 1.05
        self._runs = self._runs_increased = self._runs_monotone = 0

    # ------------------------------------------------------------------------------- learning rates
    def tune(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> dict[str, float]:
        """Tune the inner and inverse-HVP Adam rates on the current model, set and real batch (RCIG's search).

        The inner rate grows ×1.2 from ``inner_lr`` while the inner run decreases monotonically, then takes ×0.7; the
        inverse-HVP rate the same way on the ``H⁻¹g`` objective of the meta-gradient at the tuned inner rate. A CG
        solve has no rate and is left alone. Logged and checkpointed.
        """
        net, params, buffers = self._network()
        x_sup, y_sup = support_set(x_syn.detach(), self.targets(y_syn.detach()), self.use_flip)
        system = inner_system(
            net, params, buffers, x_sup, y_sup, self.ridge(), chunk=self.solve_chunk, jacobian_mb=self.jacobian_mb
        )
        report = {}
        if self.inner_solver == "adam":

            def inner_run(lr: float) -> bool:
                return SolverSettings("adam", self.inner_steps, lr).solve(system, system.b).monotone

            self.inner_lr, runs = tune_lr(inner_run, self.inner_lr)
            report.update(inner_lr=self.inner_lr, inner_tuning_runs=runs)
        if self.hinv_solver == "adam":
            # The inverse-HVP right-hand side of this step, ∂L_out/∂δ at δ*, with the tuned inner rate.
            g_delta = self.compute_meta_gradient(x_syn, y_syn, x_real, y_real).hinv_rhs

            def hinv_run(lr: float) -> bool:
                return SolverSettings("adam", self.hinv_steps, lr).solve(system, g_delta).monotone

            self.hinv_lr, runs = tune_lr(hinv_run, self.hinv_lr)
            report.update(hinv_lr=self.hinv_lr, hinv_tuning_runs=runs)
        self.tuned = True
        if report:
            rank_zero_info("RCIG: tuned " + ", ".join(f"{k}={v:.3g}" for k, v in report.items()))
            for logger in self.loggers:
                logger.log_metrics({f"train/tuned_{k}": float(v) for k, v in report.items()}, step=self.global_step)
        return report

    # ------------------------------------------------------------------------------------ checkpoints
    def method_state_dict(self) -> dict[str, Any]:
        if self.pool is None:
            return {}
        return {
            "pool": self.pool.state_dict(),
            "pool_index": self.pool_index,
            "inner_lr": self.inner_lr,
            "hinv_lr": self.hinv_lr,
            "tuned": self.tuned,
            "runs": [self._runs, self._runs_increased, self._runs_monotone],
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"], self.device)
        self.pool_index = int(state["pool_index"])
        self.inner_lr, self.hinv_lr = float(state["inner_lr"]), float(state["hinv_lr"])
        self.tuned = bool(state["tuned"])
        self._runs, self._runs_increased, self._runs_monotone = (int(v) for v in state["runs"])
        # The pool exists once the method is set up (a resumed fit); load_from_checkpoint restores it at set-up.
        self._pending_state = state
        if self.pool is not None:
            self._restore_pool()

    def _restore_pool(self) -> None:
        state = self._pending_state
        self.pool.load_state_dict(state["pool"])
        self.pool.to(self.device)
        self.pool.precision = self.network_precision
        self.pool_index = int(state["pool_index"])
        self._pending_state = None

    def config(self) -> dict[str, Any]:
        hp = super().config()
        # The tuned rates are part of what made the set.
        hp["inner_lr_now"] = self.inner_lr if math.isfinite(self.inner_lr) else str(self.inner_lr)
        hp["hinv_lr_now"] = self.hinv_lr if math.isfinite(self.hinv_lr) else str(self.hinv_lr)
        return hp
