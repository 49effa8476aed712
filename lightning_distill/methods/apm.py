"""APM: dataset distillation by adversarial prediction matching.

Chen, Huang, Lu, Li, Wang, Cheng, Wang, "Dataset Distillation via Adversarial Prediction Matching" (arXiv
2312.08912, 2023); official code github.com/mchen725/DD_APM (no licence: re-implemented here from the paper's
description and ``shared/reference/methods_memories_apm.md`` §2, nothing copied).

Single-level: every ``mid_gap + 1`` outer steps a fresh network (the student) is trained on the current synthetic
images against a randomly drawn teacher's logits, and K checkpoints along its training are kept; in between, the
images move to **maximise** the summed L1 discrepancy between the teacher and the K checkpoints, while a weighted
teacher cross-entropy keeps them on their class. The exported labels are a teacher's logits (``label_kind:
"logits"``), which the ``apm`` evaluation protocols regress with L1.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_distill.components.teachers import TeacherPool, TeacherSpec, load_teacher_pool
from lightning_distill.eval.apm_protocol import apm_student_protocol
from lightning_distill.eval.protocols import NO_FLIP_DATASETS, make_augment
from lightning_distill.eval.train import train_network
from lightning_distill.functional.apm import (
    apm_gradients,
    checkpoint_epochs,
    looped_logits,
    stack_checkpoints,
    stacked_logits,
)
from lightning_distill.methods.base import DistillationMethod, MetaStep
from lightning_distill.nets import get_net, seeded_net
from lightning_distill.optim import StepDecay
from lightning_distill.precision import PrecisionMode
from lightning_distill.synthetic.base import DistilledView, SyntheticSet

__all__ = ["APM"]


class APM(DistillationMethod):
    """Adversarial prediction matching, one image update per ``training_step`` (real batches are not used).

    Each outer step touches ``batch_syn`` images (all by default). Every ``mid_gap + 1`` steps (and at the first),
    a teacher is drawn from the pool, a freshly seeded student is trained on those images against the teacher's
    logits (SGD ``student_lr``, momentum 0.9, weight decay 5e-4, L1, DSA, ``student_epochs + 1`` epochs, lr x0.1
    at half) and ``num_checkpoints`` states along the way are kept. Then the images' gradient of

        -sum_k mean |f_k(x) - f_T(x)|  +  ce_weight * CE(f_T(x), y)

    is computed chunk by chunk (``update_syn`` images per chunk, exact accumulation) and returned as ready gradients;
    the meta-optimiser (SGD ``lr_img``, momentum 0.5, x``lr_img_decay`` at half the run, APM's) steps.

    **The memory knob.** ``update_syn`` bounds the images the networks see at once: it changes memory and time,
    never the result. ``set_on_cpu`` keeps the synthetic set (and its gradient and optimiser state) in host memory
    while the networks run on the accelerator, so accelerator memory does not grow with the set. ``batch_syn``
    changes the maths: a random subset per step (APM's large-IPC settings).

    Args:
        synthetic: the synthetic set (any parameterisation with hard labels; the labels APM learns from and exports
            are a teacher's logits).
        arch: the students' network (registry name); APM uses the teachers' (``convnet``, 4 blocks at 64 px).
        arch_kwargs: its options.
        teachers: the teacher pool's architecture and training recipe (:class:`TeacherSpec`, or its fields as a
            mapping); ``None``: APM's (100 ConvNets, 100 epochs).
        teacher_dir: folder of the pool; ``None``: the cache folder keyed by data, preprocessing and recipe.
        build_teachers: train a missing pool on first use (CPU recipes); ``False`` refuses to start without one,
            saying how to build it (``lightning-distill teachers --config RECIPE``).
        label_teacher: the teacher whose logits label the exported set (APM draws one at random at each evaluation;
            a fixed one makes comparisons reproducible).
        ce_weight: weight of the teacher cross-entropy (APM's scripts: 0.1).
        mid_gap: a new student every ``mid_gap + 1`` outer steps (APM: 2).
        student_epochs: APM's ``s_epoch`` E: a student trains E + 1 epochs (APM: 250).
        num_checkpoints: K student checkpoints, after epochs ``E/K, 2E/K, ..., E`` (APM: 5).
        student_lr: the students' SGD learning rate (APM's ``lr_net``).
        student_batch: the students' batch (APM: 256).
        batch_syn: images touched per outer step (a random subset); ``None``: all.
        update_syn: images per chunk of the image update; ``None``: one chunk of ``batch_syn``.
        set_on_cpu: keep the synthetic set on the CPU while the networks run on the accelerator.
        vmap_students: evaluate the K checkpoints in one ``vmap`` pass (``False``: one after another; same numbers,
            less memory per chunk).
        lr_img: learning rate of the images (APM's table: 1 for CIFAR, 20-40 for Tiny/ImageNet).
        momentum_img: momentum of the images' SGD (APM: 0.5).
        lr_img_decay: factor on ``lr_img`` from half of ``trainer.max_steps`` on (APM: 0.3).
        syn_optimizer: replaces the images' SGD; ``syn_scheduler`` its schedule; ``group_options`` per group.
        max_consecutive_skips: stop after this many non-finite outer steps in a row (0: never).
        seed: seeds initialisation, subsets, teacher draws and students.
        precision: precision of the network passes (students' training, the image update): ``fp32``, ``bf16``,
            ``auto``, or ``None`` for ``$LIGHTNING_DISTILL_PRECISION`` else ``auto``; gradients accumulate in the
            set's dtype.
    """

    materialise_set = False

    def __init__(
        self,
        synthetic: SyntheticSet,
        arch: str = "convnet",
        arch_kwargs: dict[str, Any] | None = None,
        teachers: TeacherSpec | dict[str, Any] | None = None,
        teacher_dir: str | None = None,
        build_teachers: bool = True,
        label_teacher: int = 0,
        ce_weight: float = 0.1,
        mid_gap: int = 2,
        student_epochs: int = 250,
        num_checkpoints: int = 5,
        student_lr: float = 0.01,
        student_batch: int = 256,
        batch_syn: int | None = None,
        update_syn: int | None = None,
        set_on_cpu: bool = False,
        vmap_students: bool = True,
        lr_img: float = 1.0,
        momentum_img: float = 0.5,
        lr_img_decay: float = 0.3,
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
        for name, value in (("mid_gap", mid_gap), ("label_teacher", label_teacher)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name, value in (("student_batch", student_batch), ("batch_syn", batch_syn), ("update_syn", update_syn)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of images (or null for all), got {value!r}")
        checkpoint_epochs(student_epochs, num_checkpoints)  # refuses K > E with the fix
        if student_lr <= 0 or lr_img <= 0:
            raise ValueError(f"student_lr and lr_img must be positive, got {student_lr} and {lr_img}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be non-negative, got {ce_weight}")
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        if isinstance(teachers, dict):
            teachers = TeacherSpec(**teachers)
        self.teachers = teachers if teachers is not None else TeacherSpec()
        # Checkpoints hold plain values only (they are read with weights_only=True): the spec as a mapping.
        self.hparams["teachers"] = asdict(self.teachers)
        if label_teacher >= self.teachers.num_teachers:
            raise ValueError(
                f"label_teacher={label_teacher} but the pool has {self.teachers.num_teachers} teachers: "
                f"use 0 .. {self.teachers.num_teachers - 1}"
            )
        self.teacher_dir, self.build_teachers, self.label_teacher = teacher_dir, build_teachers, label_teacher
        self.ce_weight, self.mid_gap = float(ce_weight), mid_gap
        self.student_epochs, self.num_checkpoints = student_epochs, num_checkpoints
        self.student_lr, self.student_batch = float(student_lr), student_batch
        self.batch_syn, self.update_syn = batch_syn, update_syn
        self.set_on_cpu, self.vmap_students = set_on_cpu, vmap_students
        self.lr_img, self.momentum_img, self.lr_img_decay = float(lr_img), float(momentum_img), float(lr_img_decay)
        self.pool: TeacherPool | None = None
        self.teacher_index = 0
        self.students: list[dict[str, Tensor]] | None = None
        # Networks are held outside the module tree (a plain dict), so Lightning never moves, checkpoints or
        # optimises them and DDP never sees them.
        self._held: dict[str, nn.Module] = {}
        self._stacked: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self.student_seconds = 0.0
        self._calls = 0

    # ------------------------------------------------------------------------------------------ set-up
    def _net_device(self) -> torch.device:
        # The module's device is still the CPU during setup(); the networks run where the trainer trains.
        if self._trainer is not None:
            return self.trainer.strategy.root_device
        return self.device

    def setup_method(self, datamodule: Any) -> None:
        if self.synthetic.label_kind == "learned":
            raise ValueError(
                "APM's labels are a teacher's logits, not learned: use a set with hard labels "
                "(PixelSet labels: hard); the export stores the logits"
            )
        c, h, _ = self.synthetic.image_shape
        k = self.synthetic.num_classes
        self._held["student"] = get_net(self.arch, c, k, h, **self.arch_kwargs).eval().requires_grad_(False)
        start = time.perf_counter()
        if self.pool is None:  # a pool set on the method beforehand (benchmarks) is used as it is
            self.pool = load_teacher_pool(
                datamodule,
                self.teachers,
                folder=self.teacher_dir,
                build=self.build_teachers,
                device=self._net_device(),
                progress=False,
                how_to_build="lightning-distill teachers --config YOUR_RECIPE.yaml",
            )
        summary = self.pool.summary()
        waited = time.perf_counter() - start
        acc = "-" if summary["test_acc"] is None else f"{summary['test_acc']:.2f}"
        rank_zero_info(
            f"APM: {len(self.pool)} teachers from {summary['folder']} (mean test accuracy {acc} %, reported only; "
            f"{summary['seconds']:.0f} s of training, {waited:.0f} s in this run)"
        )
        self.teacher_info = {**summary, "seconds_this_run": waited}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.set_on_cpu and self.device.type != "cpu":
            self._park_set_on_cpu()

    def _park_set_on_cpu(self) -> None:
        # Lightning moved the whole module to the accelerator; the set goes back to host memory. Parameter objects
        # keep their identity (Module.to swaps .data), so the optimiser still holds them; its state follows.
        self.synthetic.to("cpu")
        params = {id(p) for p in self.synthetic.parameters()}
        for opt in self.trainer.optimizers:
            for p, state in opt.state.items():
                if id(p) in params:
                    for key, value in state.items():
                        if isinstance(value, Tensor) and value.device != p.device:
                            state[key] = value.to(p.device)

    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """APM's image optimiser: SGD at ``lr_img`` with momentum ``momentum_img`` (0.5)."""
        return torch.optim.SGD(groups, lr=self.lr_img, momentum=self.momentum_img)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any | None:
        """APM's schedule: ``lr_img`` x``lr_img_decay`` (0.3) from half of the run's horizon on.

        The horizon is ``trainer.max_steps``, or the one a :class:`~lightning_distill.callbacks.TimeBudget` chooses;
        a run with neither (only ``max_time``) keeps ``lr_img`` constant.
        """
        horizon = self.trainer.max_steps if self._trainer is not None else -1
        if horizon is None or horizon < 2:
            return None
        return StepDecay(optimizer, fractions=(0.5,), gamma=self.lr_img_decay)

    # ------------------------------------------------------------------------------------------- students
    def student_seed_protocol(self, n: int) -> tuple[Any, int, list[int]]:
        """The students' protocol for ``n`` images, its step count and the steps after which checkpoints are kept."""
        batch = min(self.student_batch, n)
        protocol = apm_student_protocol(
            self.arch, self.arch_kwargs, self.student_lr, self.student_epochs + 1, batch, augment="dsa"
        )
        per_epoch = math.ceil(n / batch)
        steps = (self.student_epochs + 1) * per_epoch
        keep = [(e + 1) * per_epoch for e in checkpoint_epochs(self.student_epochs, self.num_checkpoints)]
        return protocol, steps, keep

    def train_students(self, x: Tensor, targets: Tensor, seed: int) -> list[dict[str, Tensor]]:
        """Train a fresh student (seeded by ``seed``) on ``(x, targets)`` and return its K checkpoints (CPU)."""
        c, h, _ = self.synthetic.image_shape
        k = self.synthetic.num_classes
        device = x.device
        protocol, steps, keep = self.student_seed_protocol(len(x))
        flip = self.data_info.get("dataset") not in NO_FLIP_DATASETS
        net = seeded_net(lambda: get_net(self.arch, c, k, h, **self.arch_kwargs), seed).to(device)
        gen = torch.Generator().manual_seed(seed)
        augment = make_augment(protocol, flip).to(device)
        with torch.enable_grad():
            return train_network(
                net,
                x,
                targets,
                protocol,
                steps,
                k,
                gen,
                augment,
                checkpoint_steps=keep,
                precision=self.network_precision,
            )

    @property
    def student_template(self) -> nn.Module:
        """A network of the students' architecture (eval mode, frozen) that the checkpoints' states are applied to."""
        if "student" not in self._held:
            raise RuntimeError("APM is not set up: fit it with a Trainer and a real DataModule")
        return self._held["student"]

    def _student_logits(self, x: Tensor) -> Tensor:
        p = self.network_precision
        if self.vmap_students:
            if self._stacked is None:
                self._stacked = stack_checkpoints(self.student_template, self.students, device=x.device)
            params, buffers = self._stacked
            return p.call(lambda x: stacked_logits(self.student_template, params, buffers, x), x)
        template = self.student_template.to(x.device)
        states = [{k: v.to(x.device) for k, v in s.items()} for s in self.students]
        return p.call(lambda x: looped_logits(template, states, x), x)

    def _teacher_logits(self, x: Tensor) -> Tensor:
        return self.network_precision.call(self.pool.net(self.teacher_index, x.device), x)

    # ----------------------------------------------------------------------------------------- outer step
    def touched_images(self) -> Tensor:
        """The indices this outer step updates: all images, or a random ``batch_syn`` of them (sorted)."""
        n = self.synthetic.num_images
        if self.batch_syn is None or self.batch_syn >= n:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[: self.batch_syn].sort().values

    def outer_loss(self, x_syn: Tensor | None, y_syn: Tensor | None, x_real: Tensor, y_real: Tensor) -> MetaStep:
        if self.pool is None:
            raise RuntimeError("APM has no teacher pool: fit it with a Trainer and a real DataModule")
        # The trainer's step count (exact resume); without a trainer (benchmarks) the method's own count.
        step = int(self.trainer.global_step) if self._trainer is not None else self._calls
        self._calls += 1
        device = self._net_device()
        index = self.touched_images()
        logs: dict[str, float | Tensor] = {}
        if self.students is None or step % (self.mid_gap + 1) == 0:
            # A new teacher and a new student on the images touched now (APM draws both at every retrain).
            self.teacher_index = int(torch.randint(len(self.pool), (1,), generator=self.generator))
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            start = time.perf_counter()
            with torch.no_grad():
                x_cur = self.synthetic(index)[0].detach().to(device)
                targets = self.pool.logits(self.teacher_index, x_cur, chunk_size=self.update_syn or 1024)
            self.students = self.train_students(x_cur, targets, seed)
            self._stacked = None
            self.student_seconds = time.perf_counter() - start
            logs["train/student_seconds"] = self.student_seconds
        names, params = zip(*self.named_meta_parameters().items(), strict=True)
        class_ids = self.synthetic.class_ids()[index]
        grads, values = apm_gradients(
            lambda idx: self.synthetic(idx)[0],
            params,
            index,
            class_ids,
            self._teacher_logits,
            self._student_logits,
            self.ce_weight,
            chunk_size=self.update_syn,
            device=device,
        )
        logs.update(
            {
                "train/discrepancy": values["discrepancy"].float(),
                "train/teacher_ce": values["teacher_ce"].float(),
                "train/teacher_index": float(self.teacher_index),
            }
        )
        ready = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
        return MetaStep(grads=ready, value=values["objective"].float(), logs=logs)

    # ------------------------------------------------------------------------------------------- the view
    @torch.no_grad()
    def distilled_view(self) -> DistilledView:
        """The set with a teacher's logits as labels (``label_kind: "logits"``, counted in ``storage``)."""
        view = super().distilled_view()
        if self.pool is None:
            raise RuntimeError(
                "APM exports a teacher's logits as labels, but its teacher pool is not loaded: fit the method (the "
                "pool is read from the cache) before exporting"
            )
        chunk = self.update_syn or 1024
        logits = self.pool.logits(self.label_teacher, view.images, chunk_size=chunk, device=self._net_device())
        storage = {**view.storage, "label_floats": int(logits.numel()), "label_kind": "logits"}
        return DistilledView(
            images=view.images,
            labels=logits.to(view.images.device, torch.float32),
            label_kind="logits",
            images_per_class=view.images_per_class,
            class_ids=view.class_ids,
            extras=view.extras,
            storage=storage,
            source=view.source,
        )

    def config(self) -> dict[str, Any]:
        hp = super().config()
        hp["teachers"] = asdict(self.teachers)
        if getattr(self, "teacher_info", None):
            hp["teacher_pool"] = {k: v for k, v in self.teacher_info.items() if k != "test_accs"}
        return hp

    # ------------------------------------------------------------------------------------ checkpoints
    def method_state_dict(self) -> dict[str, Any]:
        return {
            "students": [] if self.students is None else self.students,
            "teacher_index": self.teacher_index,
        }

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.students = [dict(s) for s in state["students"]] or None
        self.teacher_index = int(state["teacher_index"])
        self._stacked = None
