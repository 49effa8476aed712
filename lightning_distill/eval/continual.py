"""Class-incremental continual learning with distilled memories: the protocol of the dataset-distillation papers.

The classes are split into ``S`` steps in a seeded order (``numpy.random.RandomState(seed).permutation(C)``, the
orders the DM and FRePo codes use). At step ``s`` the new classes are distilled from their real training images only
(any method, any parameterisation) and added to the memory; a fresh network, with all ``C`` outputs from the first
step, is trained from scratch on the whole memory so far (no real data) under a named protocol and tested on the test
images of every class seen so far. The result is a curve (accuracy after each step) and its average, beside random
real memory of the same storage, over several class orders. See shared/reference/continual_learning.md.

The pieces are plain functions: :func:`class_orders`, :func:`split_classes`, :func:`evaluate_memory` (training and
testing at one step), :func:`run_continual` (the loop around a ``distil`` callable) and :func:`run_continual_recipe`
(that loop with a recipe's method distilling each step through Lightning).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill.eval.protocols import PROTOCOLS, Protocol, get_protocol, register_protocol
from lightning_distill.eval.train import train_on_distilled

__all__ = [
    "ContinualResult",
    "ContinualStep",
    "Memory",
    "RTP_PROTOCOL",
    "class_orders",
    "continual_command",
    "embed_labels",
    "evaluate_memory",
    "random_memory",
    "run_continual",
    "run_continual_recipe",
    "split_classes",
    "step_datamodule",
    "summarise",
    "table",
]

# The addressable-memories paper's own evaluation ("rtp", Remember the Past; official code, reference §1.5), which its
# continual-learning use shares: ConvNet-3 width 128 instance norm, 300 epochs, batch 640, SGD 0.01 momentum 0.9, no
# weight decay, no schedule, no augmentation; cross-entropy on hard labels. Registered here, in the eval package, so
# that `lightning-distill evaluate --protocol rtp` knows it without importing the methods.
RTP_PROTOCOL = Protocol(
    name="rtp",
    arch="convnet",
    arch_kwargs={"width": 128, "norm": "instance"},
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0,
    loss="ce",
    schedule="constant",
    epochs=300,
    batch_size=640,
    augment="none",
)
if "rtp" not in PROTOCOLS:
    register_protocol(RTP_PROTOCOL)

#: The field's defaults (shared/reference/continual_learning.md): dataset -> (steps, stored items per class).
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"steps": 5, "orders": [0, 1, 2]},
    "fashion_mnist": {"steps": 5, "orders": [0, 1, 2]},
    "cifar100": {"steps": 5, "orders": [0, 1, 2, 3, 4], "ipc": 20},
}


def class_orders(num_classes: int, seeds: Sequence[int]) -> list[list[int]]:
    """One class order per seed: ``numpy.random.RandomState(seed).permutation(num_classes)`` (the DM/FRePo orders)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return [[int(c) for c in np.random.RandomState(int(s)).permutation(num_classes)] for s in seeds]


def split_classes(order: Sequence[int], steps: int) -> list[list[int]]:
    """Consecutive, equal chunks of ``order``: the classes added at each of the ``steps`` steps.

    Raises:
        ValueError: when the classes do not split evenly (say which step counts do), or the order repeats a class.
    """
    order = [int(c) for c in order]
    if len(set(order)) != len(order):
        raise ValueError(f"a class order lists a class twice: {order}")
    n = len(order)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or n % steps:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"{n} classes do not split into {steps!r} equal steps: use one of {divisors}")
    k = n // steps
    return [order[i * k : (i + 1) * k] for i in range(steps)]


def embed_labels(labels: Tensor, classes: Sequence[int], num_classes: int) -> Tensor:
    """Labels of a set distilled on ``classes`` alone (local ids ``0..k-1``, or ``(N, k)`` float targets) as labels
    of the ``num_classes``-way problem.

    Class ids are mapped to the global ids; a float target row keeps its values in the step's columns and gives every
    other class the mean of its off-class values (a class outside the step counts like the step's other classes).
    """
    index = torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)
    if labels.ndim == 1:
        return index[labels.long()]
    k = len(classes)
    if labels.shape[1] != k:
        raise ValueError(f"float labels have {labels.shape[1]} columns, the step has {k} classes")
    own = labels.argmax(1)
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[torch.arange(len(labels)), own] = False
    off = (labels * mask).sum(1) / mask.sum(1).clamp_min(1)
    out = off[:, None].expand(len(labels), num_classes).clone()
    out[:, index] = labels
    return out


@dataclass
class Memory:
    """What one step adds to the memory: images in model-input space and global labels (ids or C-wide floats)."""

    images: Tensor
    labels: Tensor
    classes: list[int]
    storage_floats: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ContinualStep:
    """The evaluation after one step."""

    step: int
    new_classes: list[int]
    seen_classes: list[int]
    memory_images: int
    memory_floats: int
    test_images: int
    accuracies: list[float]
    random_accuracies: list[float] | None = None
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def random_mean(self) -> float | None:
        return None if not self.random_accuracies else float(np.mean(self.random_accuracies))


@dataclass
class ContinualResult:
    """One class order's run: the step results, and how they were produced."""

    order: list[int]
    splits: list[list[int]]
    steps: list[ContinualStep]
    protocol: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def curve(self) -> list[float]:
        return [s.mean for s in self.steps]

    @property
    def random_curve(self) -> list[float | None]:
        return [s.random_mean for s in self.steps]

    @property
    def average(self) -> float:
        """Mean accuracy over the steps (the field's "average accuracy")."""
        return float(np.mean(self.curve))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"], out["random_curve"], out["average"] = self.curve, self.random_curve, self.average
        rc = [r for r in self.random_curve if r is not None]
        out["random_average"] = float(np.mean(rc)) if rc else None
        return out


def random_memory(
    x_train: Tensor, y_train: Tensor, classes: Sequence[int], per_class: int, generator: torch.Generator
) -> Memory:
    """``per_class`` distinct random real training images of each class in ``classes`` (global labels)."""
    picks = []
    for c in classes:
        idx = torch.nonzero(y_train.cpu() == int(c)).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than {per_class}: lower the ipc")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    idx = torch.cat(picks)
    x = x_train[idx.to(x_train.device)]
    return Memory(x, y_train[idx.to(y_train.device)], list(classes), int(x.numel()))


def evaluate_memory(
    memories: Sequence[Memory],
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    protocol: str | Protocol = "dc",
    repeats: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    **train_kwargs: Any,
) -> tuple[list[float], dict[str, Any]]:
    """Train fresh ``num_classes``-way networks on the union of ``memories`` and test them on the seen classes only.

    Returns:
        The accuracies (%) and a record: seen classes, memory and test sizes.
    """
    seen = sorted({c for m in memories for c in m.classes})
    images = torch.cat([m.images.float().cpu() for m in memories])
    labels = [m.labels.cpu() for m in memories]
    if len({lab.ndim for lab in labels}) != 1:
        raise ValueError("the memories mix class-id and float labels: distil every step with the same label kind")
    labels = torch.cat(labels)
    keep = torch.isin(y_test.cpu(), torch.tensor(seen))
    result = train_on_distilled(
        images,
        labels,
        x_test.cpu()[keep],
        y_test.cpu()[keep],
        protocol=protocol,
        repeats=repeats,
        num_classes=num_classes,
        seed=seed,
        device=device,
        progress=False,
        **train_kwargs,
    )
    record = {"seen_classes": seen, "memory_images": len(images), "test_images": int(keep.sum())}
    return result.accuracies, record


def run_continual(
    distil: Callable[[int, list[int]], Memory],
    splits: Sequence[Sequence[int]],
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    protocol: str | Protocol = "dc",
    repeats: int = 1,
    seed: int = 0,
    random_baseline: Callable[[int, list[int], Memory], Memory] | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    **train_kwargs: Any,
) -> ContinualResult:
    """The class-incremental loop: distil each step's classes, grow the memory, retrain from scratch, test seen classes.

    Args:
        distil: ``distil(step, classes)`` gives that step's :class:`Memory` (from those classes' real data only).
        splits: the classes of each step (:func:`split_classes`).
        x_test, y_test: the test split in model-input space, global class ids.
        num_classes: outputs of the evaluation networks (all classes, from the first step).
        protocol: evaluation protocol (``dc`` for hard labels, ``krr`` for learned ones, ``rtp``, ...).
        repeats: fresh networks per step (seeded ``seed + 1000 * step + i``).
        random_baseline: ``random_baseline(step, classes, memory)`` gives random real memory of the same storage as the
            distilled ``memory``; it is evaluated beside it. ``None``: no baseline.
        device: where the evaluation networks train.
        log: called with one line per step (``None``: silent).
        train_kwargs: passed to :func:`~lightning_distill.eval.train_on_distilled` (``steps``, ``epochs``,
            ``arch``, ``arch_kwargs``, ``flip``).
    """
    spec = get_protocol(protocol)
    memories: list[Memory] = []
    randoms: list[Memory] = []
    steps: list[ContinualStep] = []
    for s, classes in enumerate(splits):
        classes = [int(c) for c in classes]
        start = time.perf_counter()
        memory = distil(s, classes)
        if sorted(set(memory.classes)) != sorted(classes):
            raise ValueError(f"step {s}: distil returned classes {memory.classes}, expected {classes}")
        memories.append(memory)
        accs, rec = evaluate_memory(
            memories, x_test, y_test, num_classes, spec, repeats, seed + 1000 * s, device, **train_kwargs
        )
        r_accs = None
        if random_baseline is not None:
            randoms.append(random_baseline(s, classes, memory))
            r_accs, _ = evaluate_memory(
                randoms, x_test, y_test, num_classes, spec, repeats, seed + 1000 * s, device, **train_kwargs
            )
        step = ContinualStep(
            s,
            classes,
            rec["seen_classes"],
            rec["memory_images"],
            sum(m.storage_floats for m in memories),
            rec["test_images"],
            accs,
            r_accs,
            time.perf_counter() - start,
        )
        steps.append(step)
        if log is not None:
            rnd = "" if step.random_mean is None else f", random real {step.random_mean:.2f}"
            log(
                f"step {s + 1}/{len(splits)}: +classes {classes}, {step.memory_images} images in memory, "
                f"{spec.name} acc on {len(step.seen_classes)} seen classes {step.mean:.2f}{rnd} ({step.seconds:.0f} s)"
            )
    order = [c for split in splits for c in split]
    return ContinualResult(order, [list(map(int, sp)) for sp in splits], steps, spec.to_dict())


# ----------------------------------------------------------------------------------------- from a recipe
def step_datamodule(parent: Any, classes: Sequence[int], seed: int = 0) -> Any:
    """A DataModule holding only ``classes`` of ``parent``'s real data, relabelled ``0..k-1``, in the same input space.

    The step's normalisation is the parent's (its mean/std are passed explicitly), so every step's memory and the test
    split share one model-input space. ZCA is refused (a whitening fitted per step would differ between steps).
    """
    from lightning_distill.data import ArrayDataModule

    prep = parent.preprocessing
    if getattr(prep, "zca", None) not in (None, "none") or getattr(parent, "zca", "none") != "none":
        raise ValueError("continual learning needs zca: none (a ZCA fitted on each step's classes would differ)")
    x_tr, y_tr = parent.load_split("train")
    x_te, y_te = parent.load_split("test")
    index = {int(c): i for i, c in enumerate(classes)}

    def subset(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        keep = torch.isin(y, torch.tensor(list(index)))
        return x[keep], torch.tensor([index[int(v)] for v in y[keep]], dtype=torch.long)

    xs, ys = subset(x_tr, y_tr)
    xt, yt = subset(x_te, y_te)
    names = [str(parent.class_names[c]) for c in classes]
    hp = dict(getattr(parent, "hparams", {}))
    return ArrayDataModule(
        x_train=xs,
        y_train=ys,
        x_test=xt,
        y_test=yt,
        name=parent.name,
        classes=names,
        mean=[float(v) for v in prep.mean],
        std=[float(v) for v in prep.std],
        batch_size=int(hp.get("batch_size", getattr(parent, "batch_size", 256))),
        val_size=hp.get("val_size", 0.1),
        seed=seed,
    )


def run_continual_recipe(
    recipe: str | Path,
    steps: int | None = None,
    orders: Sequence[int] | None = None,
    protocol: str | None = None,
    repeats: int | None = None,
    max_steps: int | None = None,
    minutes: float | None = None,
    random_baseline: bool = True,
    eval_steps: int | None = None,
    eval_epochs: int | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path = "runs/continual",
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> list[ContinualResult]:
    """The whole protocol from a recipe: for each class order and step, the recipe's method distils the step's classes.

    Settings left ``None`` come from the recipe's :class:`~lightning_distill.callbacks.ContinualLearningEval` when it
    has one, else from the dataset's defaults (:data:`DEFAULTS`; protocol ``dc``, one network). That callback is
    taken out of each step's own ``fit`` (its split would not fit a step's few classes).

    Args:
        recipe: a ``lightning-distill fit`` recipe (method, set, data, trainer); its DataModule gives the real data.
        steps: class-incremental steps (default: the dataset's, e.g. 5 for MNIST; :data:`DEFAULTS`).
        orders: seeds of the class orders (default: the dataset's, e.g. 0, 1, 2).
        protocol: evaluation protocol of every step.
        repeats: fresh networks per step evaluation.
        max_steps: outer steps of each step's distillation (default: the recipe's).
        minutes: wall-clock cap of each step's distillation.
        random_baseline: also evaluate random real memory of the same storage.
        eval_steps, eval_epochs: override the protocol's length (CPU budgets).
        arch_kwargs: options of the evaluation network (e.g. ``{"width": 64}``).
        overrides: further ``--key=value`` arguments for the recipe.
        run_dir: where each step's distillation writes its files.
        device: where the evaluation networks train.
        log: progress lines (``None``: silent).
    """
    from lightning_distill.cli import cli_main
    from lightning_distill.eval.protocols import NO_FLIP_DATASETS

    def parse(root: Path) -> Any:
        args = ["--config", str(recipe), f"--trainer.default_root_dir={root}", "--trainer.logger=false"]
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        if max_steps is not None:
            args.append(f"--trainer.max_steps={max_steps}")
        if minutes is not None:
            hh, mm = divmod(int(minutes * 60), 3600)
            args.append(f"--trainer.max_time=00:{hh:02d}:{mm // 60:02d}:{mm % 60:02d}")
        cli = cli_main([*args, *overrides], run=False)
        cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if type(cb).__name__ != "ContinualLearningEval"]
        return cli

    import warnings

    from lightning_distill.callbacks.continual import ContinualLearningEval

    # cli_main is given the recipe's arguments on purpose (not sys.argv, which holds this command's own).
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
    run_dir = Path(run_dir)
    probe = cli_main(
        ["--config", str(recipe), f"--trainer.default_root_dir={run_dir / 'parse'}", "--trainer.logger=false"]
        + list(overrides),
        run=False,
    )
    given = next((cb.settings() for cb in probe.trainer.callbacks if isinstance(cb, ContinualLearningEval)), {})
    steps = steps or given.get("steps")
    orders = orders if orders is not None else given.get("orders")
    protocol = protocol or given.get("protocol") or "dc"
    repeats = repeats or given.get("repeats") or 1
    eval_steps = eval_steps or given.get("eval_steps")
    eval_epochs = eval_epochs or given.get("eval_epochs")
    arch_kwargs = arch_kwargs or given.get("arch_kwargs")
    first = probe
    parent = first.datamodule
    parent.setup("fit")
    dataset, num_classes = parent.name, parent.num_classes
    defaults = DEFAULTS.get(dataset, {"steps": 5, "orders": [0, 1, 2]})
    steps = steps or defaults["steps"]
    orders = list(orders) if orders is not None else defaults["orders"]
    x_train, y_train = parent.x_train.cpu(), parent.y_train.cpu()
    x_test, y_test = parent.x_test.cpu(), parent.y_test.cpu()
    flip = dataset not in NO_FLIP_DATASETS
    d = math.prod(parent.image_shape)
    results = []
    for seed in orders:
        order = class_orders(num_classes, [seed])[0]
        splits = split_classes(order, steps)

        def distil(s: int, classes: list[int], seed: int = seed) -> Memory:
            cli = parse(run_dir / f"order{seed}" / f"step{s}")
            dm = step_datamodule(parent, classes, seed=seed)
            cli.trainer.fit(cli.model, datamodule=dm)
            view = cli.model.distilled_view()
            storage = dict(view.storage)
            return Memory(
                view.images.detach().cpu(),
                embed_labels(view.labels.detach().cpu(), classes, num_classes),
                classes,
                int(storage.get("floats", view.images.numel())),
                {"outer_steps": int(cli.trainer.global_step), "storage": storage},
            )

        def baseline(s: int, classes: list[int], memory: Memory, seed: int = seed) -> Memory:
            # The same floats as the distilled memory, in whole real images per class (at least one).
            per_class = max(1, math.ceil(memory.storage_floats / (len(classes) * d) - 1e-9))
            g = torch.Generator().manual_seed(seed * 100 + s)
            return random_memory(x_train, y_train, classes, per_class, g)

        if log is not None:
            log(f"class order {seed}: {splits}")
        result = run_continual(
            distil,
            splits,
            x_test,
            y_test,
            num_classes,
            protocol=protocol,
            repeats=repeats,
            seed=seed,
            random_baseline=baseline if random_baseline else None,
            device=device,
            log=log,
            steps=eval_steps,
            epochs=eval_epochs,
            arch_kwargs=arch_kwargs,
            flip=flip,
        )
        result.config = {
            "recipe": str(recipe),
            "dataset": dataset,
            "protocol": protocol,
            "order_seed": seed,
            "steps": steps,
            "max_steps": max_steps,
            "minutes": minutes,
            "repeats": repeats,
            "eval_steps": eval_steps,
            "eval_epochs": eval_epochs,
            "arch_kwargs": copy.deepcopy(arch_kwargs),
            "overrides": list(overrides),
        }
        results.append(result)
    return results


def summarise(results: Sequence[ContinualResult]) -> dict[str, Any]:
    """Mean and std over class orders of the per-step curves and averages (distilled and random real)."""

    def stats(curves: list[list[float]]) -> dict[str, list[float]]:
        arr = np.asarray(curves, dtype=float)
        return {"mean": arr.mean(0).tolist(), "std": arr.std(0).tolist()}

    out: dict[str, Any] = {"orders": [r.config.get("order_seed") for r in results]}
    out["curve"] = stats([r.curve for r in results])
    out["average"] = float(np.mean([r.average for r in results]))
    out["average_std"] = float(np.std([r.average for r in results]))
    if all(None not in r.random_curve for r in results):
        rc = [[float(v) for v in r.random_curve] for r in results]
        out["random_curve"] = stats(rc)
        out["random_average"] = float(np.mean([np.mean(c) for c in rc]))
        out["random_average_std"] = float(np.std([np.mean(c) for c in rc]))
    return out


def table(results: Sequence[ContinualResult]) -> str:
    """A markdown table: accuracy after each step (mean ± std over orders), distilled and random real."""
    s = summarise(results)
    n = len(s["curve"]["mean"])
    head = "| memory | " + " | ".join(f"step {i + 1}" for i in range(n)) + " | average |"
    rows = [head, "|---" * (n + 2) + "|"]

    def row(name: str, curve: dict[str, list[float]], avg: float, std: float) -> str:
        cells = [f"{m:.1f} ± {d:.1f}" for m, d in zip(curve["mean"], curve["std"], strict=True)]
        return f"| {name} | " + " | ".join(cells) + f" | {avg:.1f} ± {std:.1f} |"

    rows.append(row("distilled", s["curve"], s["average"], s["average_std"]))
    if "random_curve" in s:
        rows.append(row("random real (same storage)", s["random_curve"], s["random_average"], s["random_average_std"]))
    return "\n".join(rows)


def continual_command(argv: list[str]) -> int:
    """``lightning-distill continual --config RECIPE [options] [-- recipe overrides]``: the whole protocol."""
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="lightning-distill continual",
        description="Class-incremental continual learning: distil each step's classes with the recipe's method, "
        "retrain fresh networks on the memory so far, test on the classes seen so far; random real of the same "
        "storage beside it. Settings not given come from the recipe's ContinualLearningEval callback.",
        epilog="Arguments after -- go to the recipe, e.g. -- --model.init_args.inner_steps=20",
    )
    p.add_argument("--config", required=True, help="a lightning-distill fit recipe")
    p.add_argument("--steps", type=int, default=None, help="class-incremental steps (default: recipe / dataset)")
    p.add_argument("--orders", default=None, help="comma-separated seeds of the class orders, e.g. 0,1,2")
    p.add_argument("--protocol", default=None, help="evaluation protocol (dc, krr, rtp, ...)")
    p.add_argument("--repeats", type=int, default=None, help="fresh networks per step")
    p.add_argument("--max-steps", type=int, default=None, help="outer steps of each step's distillation")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap of each step's distillation")
    p.add_argument("--eval-steps", type=int, default=None, help="override the protocol's optimiser steps")
    p.add_argument("--eval-epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--arch-kwargs", default=None, help='JSON options of the evaluation network, e.g. {"width": 64}')
    p.add_argument("--no-random", action="store_true", help="skip the random-real baseline")
    p.add_argument("--run-dir", default="runs/continual", help="where each step's distillation writes")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default=None, help="where the evaluation networks train")
    end = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:end])
    results = run_continual_recipe(
        a.config,
        steps=a.steps,
        orders=[int(s) for s in a.orders.split(",")] if a.orders else None,
        protocol=a.protocol,
        repeats=a.repeats,
        max_steps=a.max_steps,
        minutes=a.minutes,
        random_baseline=not a.no_random,
        eval_steps=a.eval_steps,
        eval_epochs=a.eval_epochs,
        arch_kwargs=json.loads(a.arch_kwargs) if a.arch_kwargs else None,
        overrides=argv[end + 1 :],
        run_dir=a.run_dir,
        device=a.device,
    )
    print(table(results))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"summary": summarise(results), "runs": [r.to_dict() for r in results]}
        Path(a.out).write_text(json.dumps(payload, indent=2))
    return 0
