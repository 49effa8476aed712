"""``MemoriesBPTT``: back-propagation through a long SGD-with-momentum unroll, the algorithm of the addressable-memories
paper.

Deng & Russakovsky, "Remember the Past: Distilling Datasets into Addressable Memories for Neural Networks",
NeurIPS 2022 (official code: princetonvisualai/RememberThePast-DatasetDistillation, no licence; re-implemented here
from the description in shared/reference/methods_memories_apm.md §1, no code copied).

Each outer step trains a fresh, seeded network for ``T`` SGD-with-momentum steps on per-class batches drawn from the
synthetic set, scores the final network by cross-entropy on a real batch, and obtains the exact hyper-gradient by the
memory-efficient reverse pass of :mod:`lightning_distill.functional.unroll` (``T`` weight snapshots, one step's graph
at a time). The gradient is clipped to a global norm and applied by SGD (lr 0.1, momentum 0.5).

Precision: the network passes (every inner step's forward and backward, the real batch's forward) follow the method's
precision policy (:mod:`lightning_distill.precision`). The reverse pass rebuilds each step's graph with the same
``loss_fn``, so under bf16 it differentiates the bf16 unroll, but only to bf16 rounding: the unroll's first-order
gradients take group norm's fused backward kernel and the reverse pass its twice-differentiable form, which round bf16
activations differently (in float32 the two agree to rounding; ``tests/test_unroll.py`` bounds both). The weights,
their snapshots, the momentum buffers, the adjoints ``dw``, ``dv`` and the hyper-gradient stay float32 whatever the
policy.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call

from lightning_distill.eval.continual import RTP_PROTOCOL
from lightning_distill.functional.unroll import reverse_sgd, unroll_sgd
from lightning_distill.methods.base import DistillationMethod, MetaStep
from lightning_distill.nets import get_net, list_nets, seeded_net
from lightning_distill.precision import PrecisionMode
from lightning_distill.synthetic.base import SyntheticSet

__all__ = ["RTP_PROTOCOL", "MemoriesBPTT", "inner_cross_entropy"]


def inner_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy on class ids, or soft cross-entropy ``−Σ y·log softmax`` on float targets (learned labels)."""
    if y.ndim == 1:
        return F.cross_entropy(logits, y)
    return -(y.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(1).mean()


class MemoriesBPTT(DistillationMethod):
    """BPTT dataset distillation with an exact reverse pass through SGD with momentum (the paper's algorithm).

    Works on any synthetic set: on :class:`~lightning_distill.synthetic.AddressableMemories` it is the paper's
    method, on :class:`~lightning_distill.synthetic.PixelSet` plain BPTT (the paper's no-memory row). Each outer step:

    1. draws a fresh network (``arch``), seeded from the method's generator (so runs and resumes are exact);
    2. optionally draws ``task_classes`` classes (task sampling); the inner batches and the real batch keep only
       those, the network keeps every output;
    3. runs ``inner_steps`` SGD steps (``inner_lr``, ``inner_momentum``) on batches of ``per_class_batch`` addresses
       per class (without replacement within a step), augmented by ``augment`` with parameters drawn per step and
       replayed in the reverse pass;
    4. takes the cross-entropy of the final network on the real batch and its exact hyper-gradient by
       :func:`~lightning_distill.functional.unroll.reverse_sgd` (returned as ``MetaStep(grads=...)``);
    5. adds the coefficient regulariser's gradient ``α·∂‖coeff‖/∂coeff`` straight to the coefficients' gradient
       (pitfall P-R1: the official code adds the term to the inner loss, where it has no effect), clips the global
       norm to ``clip_norm`` and steps the outer optimiser (default SGD lr 0.1, momentum 0.5).

    Args:
        synthetic: the synthetic set (any parameterisation).
        arch: inner network (registry name); the paper's ConvNet is ``convnet`` (width 128, instance norm).
        arch_kwargs: options of the inner network (``width``, ``depth``, ...).
        inner_steps: ``T``, SGD steps per outer step (official: 150).
        inner_lr: inner SGD learning rate (official: 0.01, not learned).
        inner_momentum: inner SGD momentum (official: 0.9).
        inner_weight_decay: inner L2 weight decay (official: none).
        per_class_batch: addresses per class in each inner batch, capped at the set's images per class (official: 32
            with memories, 10 without).
        task_classes: classes drawn per outer step (task sampling); ``None`` uses every class.
        clip_norm: global norm the hyper-gradient is clipped to (official: 2); ``None`` does not clip.
        coeff_reg: ``none`` (default), ``l1`` or ``l2`` (the norm, not squared) on the memory's coefficients.
        coeff_reg_alpha: weight of the coefficient regulariser (official: 1e-4).
        snapshot_device: where the ``T`` weight snapshots live (``cpu`` spares accelerator memory); ``None``: with
            the network.
        syn_optimizer: outer optimiser factory; ``None`` is the official SGD lr 0.1, momentum 0.5.
        syn_scheduler: outer schedule (official: none).
        group_options: optimiser settings per meta-parameter group (``bases``, ``coefficients``, ``images``,
            ``labels``).
        augment: a replayable augmentation (``sample``/``apply``, e.g. :class:`~lightning_distill.augment.DSA`);
            ``None`` (the official default) augments nothing. The official code draws one transform per outer step;
            here every inner step (and the real batch) draws its own, which the reverse pass replays exactly.
        max_consecutive_skips: stop after this many non-finite outer steps in a row (0: never).
        seed: seeds the networks, the class and address draws and the augmentation.
        precision: precision of the network passes (``fp32``, ``bf16`` or ``auto``; ``None``: the
            ``LIGHTNING_DISTILL_PRECISION`` environment variable, else ``auto``). Snapshots, momentum, adjoints and
            the hyper-gradient stay float32.
    """

    materialise_set = False

    def __init__(
        self,
        synthetic: SyntheticSet,
        arch: str = "convnet",
        arch_kwargs: dict[str, Any] | None = None,
        inner_steps: int = 150,
        inner_lr: float = 0.01,
        inner_momentum: float = 0.9,
        inner_weight_decay: float = 0.0,
        per_class_batch: int = 32,
        task_classes: int | None = None,
        clip_norm: float | None = 2.0,
        coeff_reg: Literal["none", "l1", "l2"] = "none",
        coeff_reg_alpha: float = 1e-4,
        snapshot_device: str | None = None,
        syn_optimizer: OptimizerCallable | None = None,
        syn_scheduler: LRSchedulerCallable | None = None,
        group_options: dict[str, dict[str, Any]] | None = None,
        augment: nn.Module | None = None,
        max_consecutive_skips: int = 20,
        seed: int = 0,
        precision: PrecisionMode | None = None,
    ) -> None:
        super().__init__(
            synthetic=synthetic,
            syn_optimizer=syn_optimizer,
            syn_scheduler=syn_scheduler,
            group_options=group_options,
            augment=augment,
            max_consecutive_skips=max_consecutive_skips,
            seed=seed,
            precision=precision,
        )
        if arch not in list_nets():
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(list_nets())}")
        for name, value in (("inner_steps", inner_steps), ("per_class_batch", per_class_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not inner_lr > 0 or not 0 <= inner_momentum < 1 or inner_weight_decay < 0:
            raise ValueError(
                f"need inner_lr > 0, 0 <= inner_momentum < 1 and inner_weight_decay >= 0, got {inner_lr}, "
                f"{inner_momentum}, {inner_weight_decay}"
            )
        if task_classes is not None and (not isinstance(task_classes, int) or task_classes < 1):
            raise ValueError(f"task_classes must be a positive integer or null (every class), got {task_classes!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or null (no clipping), got {clip_norm!r}")
        if coeff_reg not in ("none", "l1", "l2"):
            raise ValueError(f"coeff_reg must be 'none', 'l1' or 'l2', got {coeff_reg!r}")
        if augment is not None and not (hasattr(augment, "sample") and hasattr(augment, "apply")):
            raise ValueError(
                f"augment must draw replayable parameters (sample/apply, e.g. lightning_distill.augment.DSA), got "
                f"{type(augment).__name__}: the reverse pass must replay each inner step's augmentation"
            )
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        self.inner_steps, self.inner_lr = inner_steps, float(inner_lr)
        self.inner_momentum, self.inner_weight_decay = float(inner_momentum), float(inner_weight_decay)
        self.per_class_batch, self.task_classes = per_class_batch, task_classes
        self.clip_norm = clip_norm
        self.coeff_reg, self.coeff_reg_alpha = coeff_reg, float(coeff_reg_alpha)
        self.snapshot_device = snapshot_device

    # ------------------------------------------------------------------------------------------ set-up
    def setup_method(self, datamodule: Any) -> None:
        k = self.synthetic.num_classes
        if self.task_classes is not None and self.task_classes > k:
            raise ValueError(f"task_classes={self.task_classes} exceeds the {k} classes of the data: use <= {k}")
        if self.coeff_reg != "none" and not isinstance(getattr(self.synthetic, "coefficients", None), nn.Parameter):
            raise ValueError(
                f"coeff_reg={self.coeff_reg!r} needs a set with learned coefficients (AddressableMemories), "
                f"not {type(self.synthetic).__name__}: set coeff_reg: none"
            )

    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The official outer optimiser: SGD lr 0.1, momentum 0.5."""
        return torch.optim.SGD(groups, lr=0.1, momentum=0.5)

    def build_network(self, seed: int) -> nn.Module:
        """A fresh inner network, initialised from ``seed`` alone, on the method's device."""
        c, h, _ = self.synthetic.image_shape
        k = self.synthetic.num_classes
        return seeded_net(lambda: get_net(self.arch, c, k, h, **self.arch_kwargs), seed).to(self.device)

    # ------------------------------------------------------------------------------------- outer step
    def draw_classes(self) -> Tensor:
        """The classes of this outer step (all, or ``task_classes`` drawn without replacement), sorted."""
        k = self.synthetic.num_classes
        if self.task_classes is None or self.task_classes >= k:
            return torch.arange(k)
        return torch.randperm(k, generator=self.generator)[: self.task_classes].sort().values

    def draw_batches(self, classes: Tensor) -> list[Tensor]:
        """One index batch per inner step: ``min(per_class_batch, r)`` distinct addresses of each class."""
        r = self.synthetic.images_per_class
        n = min(self.per_class_batch, r)
        batches = []
        for _ in range(self.inner_steps):
            picks = [int(c) * r + torch.randperm(r, generator=self.generator)[:n] for c in classes]
            batches.append(torch.cat(picks))
        return batches

    def outer_loss(self, x_syn: Tensor | None, y_syn: Tensor | None, x_real: Tensor, y_real: Tensor) -> MetaStep | None:
        device = self.device
        classes = self.draw_classes()
        keep = torch.isin(y_real, classes.to(y_real.device))
        if not bool(keep.any()):
            return None  # no real image of this step's classes: nothing to learn
        x_real, y_real = x_real[keep], y_real[keep]
        prec = self.network_precision
        net = prec.module(self.build_network(int(torch.randint(2**62, (1,), generator=self.generator))))
        params = {n: p.detach() for n, p in net.named_parameters()}
        buffers = {n: b for n, b in net.named_buffers()}
        batches = [b.to(device) for b in self.draw_batches(classes)]
        aug = self.augment
        aug_params = [aug.sample(len(b), self.generator, device) for b in batches] if aug is not None else None
        real_params = aug.sample(len(x_real), self.generator, device) if aug is not None else None

        meta = {n: p for n, p in self.synthetic.named_parameters() if p.requires_grad}

        def batch_fn(t: int, m: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            x, y = functional_call(self.synthetic, m, (batches[t],))
            if aug is not None:
                x = aug.apply(x, aug_params[t])
            return x, y

        def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
            # One network pass under the policy; the reverse pass replays it through this same function.
            return prec.call(lambda x_: functional_call(net, {**p, **buffers}, (x_,)), x)

        def loss_fn(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return inner_cross_entropy(forward(p, x), y)

        trace = unroll_sgd(
            loss_fn,
            params,
            batch_fn,
            meta,
            self.inner_steps,
            self.inner_lr,
            self.inner_momentum,
            self.inner_weight_decay,
            snapshot_device=self.snapshot_device,
        )
        x_eval = aug.apply(x_real, real_params) if aug is not None else x_real
        with torch.enable_grad():
            w_T = {k: v.detach().requires_grad_(True) for k, v in trace.params.items()}
            logits = forward(w_T, x_eval)
            outer = F.cross_entropy(logits, y_real)
            dw = torch.autograd.grad(outer, list(w_T.values()))
        grad_meta, _ = reverse_sgd(loss_fn, trace, batch_fn, meta, dict(zip(w_T, dw, strict=True)))
        grads = {f"synthetic.{n}": g for n, g in grad_meta.items()}
        logs: dict[str, float | Tensor] = {
            "train/inner_loss_first": trace.losses[0],
            "train/inner_loss_last": trace.losses[-1],
            "train/outer_acc": (logits.argmax(1) == y_real).float().mean().detach(),
        }
        key = "synthetic.coefficients"
        if self.coeff_reg != "none" and key in grads:
            coef = meta["coefficients"].detach()
            reg = coef.abs().sum() if self.coeff_reg == "l1" else coef.norm()
            # The regulariser's own gradient, added to the hyper-gradient (see pitfall P-R1 in the class docstring).
            d = coef.sign() if self.coeff_reg == "l1" else coef / reg.clamp_min(1e-12)
            grads[key] = grads[key] + self.coeff_reg_alpha * d
            logs["train/coeff_reg"] = reg
        return MetaStep(grads=grads, value=outer.detach(), logs=logs)

    def before_meta_update(self, params: dict[str, nn.Parameter]) -> dict[str, float | Tensor]:
        """Clip the hyper-gradient to the global norm ``clip_norm`` (official: 2)."""
        if self.clip_norm is None:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values()]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), self.clip_norm)
        return {"train/grad_norm_total": norm}
