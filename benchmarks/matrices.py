"""Named benchmark matrices: which (method × dataset × IPC) cells ``benchmarks/suite.py`` runs, and at what budget.

A cell is one recipe run through ``benchmarks/distill_cell.py`` under a :class:`Budget`. The random-real baseline
is not a cell of its own: ``distill_cell.py`` scores random real images at the same IPC inside every cell, so each
FRePo cell yields a FRePo row and a random-real row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Budget:
    """How much work one cell gets; every field maps onto one ``distill_cell.py`` option.

    Args:
        minutes: wall-clock cap of the distillation (``--minutes``).
        max_steps: outer steps (``--max-steps``, also the cosine horizon); ``None`` keeps the recipe's.
        repeats: fresh networks per evaluation (``--repeats``).
        random_repeats: networks per evaluation of random real (``--random-repeats``); ``None`` means ``repeats``.
        krr_arch_kwargs: options of the krr evaluation network (``--krr-arch-kwargs``), e.g. ``{"width": 64}``.
        dc_epochs: override the dc protocol's 1000 epochs (``--dc-epochs``).
        eval_steps: override both protocols' step counts (``--eval-steps``).
        curve: snapshots scored for the accuracy-against-minutes curve (``--curve``).
    """

    minutes: float
    max_steps: int | None = None
    repeats: int = 5
    random_repeats: int | None = None
    krr_arch_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    dc_epochs: int | None = None
    eval_steps: int | None = None
    curve: int = 0

    def args(self) -> list[str]:
        """The ``distill_cell.py`` options that give this budget."""
        out = ["--minutes", f"{self.minutes:g}", "--repeats", str(self.repeats), "--curve", str(self.curve)]
        if self.max_steps is not None:
            out += ["--max-steps", str(self.max_steps)]
        if self.random_repeats is not None:
            out += ["--random-repeats", str(self.random_repeats)]
        if self.krr_arch_kwargs:
            out += ["--krr-arch-kwargs", json.dumps(self.krr_arch_kwargs, sort_keys=True)]
        if self.dc_epochs is not None:
            out += ["--dc-epochs", str(self.dc_epochs)]
        if self.eval_steps is not None:
            out += ["--eval-steps", str(self.eval_steps)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as recorded in a cell's JSON under ``"budget"`` (compared to decide whether to re-run)."""
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One recipe at one budget."""

    recipe: str  # relative to the repository root
    budget: Budget

    @property
    def stem(self) -> str:
        """The name ``distill_cell.py`` gives the cell's outputs: ``<method folder>_<recipe stem>``."""
        p = Path(self.recipe)
        return f"{p.parent.name}_{p.stem}"

    @property
    def path(self) -> Path:
        """The recipe file."""
        return REPO / self.recipe


@dataclass(frozen=True)
class Matrix:
    """A named list of cells."""

    name: str
    description: str
    cells: tuple[Cell, ...]


# The CPU budget of the measured CPU cells (30 minutes, a 2400-step cosine horizon, 5 networks per evaluation, the
# krr network at width 64 as in the CPU recipes, 3 snapshots for the accuracy-against-minutes curve).
CPU_BUDGET = Budget(minutes=30, max_steps=2400, repeats=5, krr_arch_kwargs={"width": 64}, curve=3)
# IPC 10 on the CPU: each krr network trains 2000 steps on 100 images (~11 min on one core) and each dc network 1000
# epochs (~9 min), so the cell takes 2 networks for the distilled set and 1 for random real, and no curve; the
# distillation runs the lr 3e-3 recipes with a 2000-step cosine horizon (~0.8 s/step on one thread with the tuned
# allocator, so ~25 min; on MNIST 2000 steps measured 97.55 (krr, 2 nets) against 97.4 for 1600).
CPU_BUDGET_IPC10 = Budget(
    minutes=30, max_steps=2000, repeats=2, random_repeats=1, krr_arch_kwargs={"width": 64}, curve=0
)
# RCIG's CPU recipes stop themselves at 29 minutes (learning-rate tuning included) and keep no cosine horizon, so
# the budget leaves the recipe's step cap alone; evaluation as for FRePo's cells at the same IPC.
RCIG_CPU_BUDGET = Budget(minutes=29, repeats=5, krr_arch_kwargs={"width": 64}, curve=3)
RCIG_CPU_BUDGET_IPC10 = Budget(minutes=29, repeats=2, random_repeats=1, krr_arch_kwargs={"width": 64}, curve=0)
# On a GPU the recipes run as published; one hour per cell, the recipe's own cosine horizon. distill_cell.py scores
# the sets on the CPU (device="cpu" in its score()), so the full dc protocol makes the evaluation the long part.
GPU_BUDGET = Budget(minutes=60, repeats=5, curve=3)
# Plumbing only (tests): two outer steps, one network per evaluation, a narrow krr network, one dc epoch.
SMOKE_BUDGET = Budget(minutes=1, max_steps=2, repeats=1, krr_arch_kwargs={"width": 8}, dc_epochs=1, eval_steps=2)


# MemoriesBPTT's CPU recipes: ~1.8 s per outer step on one loaded core, so 900 steps fill the 30 minutes. A memory
# generates many images from its budget (MNIST budget 1: 290, budget 10: 4700), so every evaluation step is a full
# batch (dc: 256 images through the width-128 ConvNet, measured 1.75 s/step on one loaded core; krr at width 64:
# 1.1 s/step) and the protocols' own lengths (dc 2000 steps at 290 images, krr 5000-40000) would take hours per
# network. These cells train every network for 500 steps (--eval-steps, random real's too: half its dc length at
# budget 1), 2 networks each: ~45 minutes of evaluation per cell. The paper's protocol is run apart on the export:
# lightning-distill evaluate runs/bench/<cell>/distilled.pt --protocol rtp.
# FRePo under the precision policy (bf16 where the CPU has it) with a TimeBudget: the recipe chooses its own horizon
# from the measured step time (28 minutes of fit), so the cell passes no --max-steps; the evaluation as CPU_BUDGET's.
CPU_BF16_BUDGET = Budget(minutes=30, repeats=5, krr_arch_kwargs={"width": 64}, curve=3)
# The IPC 1 recipes chosen by benchmarks/sweep.py (sweep_frepo_*_ipc1_cpu_bf16.md): the same evaluation; random real
# at the same dataset and IPC is scored in the cpu-bf16 cells, so not again here.
CPU_BF16_SWEPT_BUDGET = Budget(minutes=30, repeats=5, random_repeats=0, krr_arch_kwargs={"width": 64}, curve=3)
# The same cells scored with the krr protocol's own network (the paper's width 128 rather than the CPU cells' 64): it
# costs about 2.2 CPU-minutes per network at IPC 1, twice the narrow one.
CPU_BF16_PAPER_EVAL_BUDGET = Budget(minutes=30, repeats=5, random_repeats=0, curve=3)
CPU_BF16_BUDGET_IPC10 = Budget(minutes=30, repeats=2, random_repeats=1, krr_arch_kwargs={"width": 64}, curve=0)
MEMORIES_CPU_BUDGET = Budget(
    minutes=30, max_steps=900, repeats=2, krr_arch_kwargs={"width": 64}, eval_steps=500, curve=0
)


def _cells(method: str, datasets: list[str], ipcs: list[int], suffix: str, budget: Budget) -> tuple[Cell, ...]:
    """Cells ``recipes/<method>/<dataset>_ipc<k><suffix>.yaml``; where no such recipe exists, the full recipe."""
    cells = []
    for dataset in datasets:
        for ipc in ipcs:
            recipe = f"recipes/{method}/{dataset}_ipc{ipc}{suffix}.yaml"
            if suffix and not (REPO / recipe).is_file():
                recipe = f"recipes/{method}/{dataset}_ipc{ipc}.yaml"  # use what exists
            cells.append(Cell(recipe, budget))
    return tuple(cells)


MATRICES: dict[str, Matrix] = {
    m.name: m
    for m in [
        Matrix(
            "cpu",
            "FRePo (the CPU recipes at lr 3e-3) and RCIG (its CPU recipes), and inside each cell random real, on MNIST "
            "and Fashion-MNIST at IPC 1 and 10, 30 minutes per cell",
            _cells("frepo", ["mnist", "fashion_mnist"], [1], "_cpu_lr3e-3", CPU_BUDGET)
            + _cells("frepo", ["mnist", "fashion_mnist"], [10], "_cpu_lr3e-3", CPU_BUDGET_IPC10)
            + _cells("rcig", ["mnist", "fashion_mnist"], [1], "_cpu", RCIG_CPU_BUDGET)
            + _cells("rcig", ["mnist", "fashion_mnist"], [10], "_cpu", RCIG_CPU_BUDGET_IPC10),
        ),
        Matrix(
            "cpu-bf16",
            "FRePo's CPU recipes under the precision policy (bf16 where the CPU has it) with the paper's pool network "
            "and real batch, and a 28-minute TimeBudget choosing the horizon, MNIST and Fashion-MNIST at IPC 1 and 10",
            _cells("frepo", ["mnist", "fashion_mnist"], [1], "_cpu_bf16", CPU_BF16_BUDGET)
            + _cells("frepo", ["mnist", "fashion_mnist"], [10], "_cpu_bf16", CPU_BF16_BUDGET_IPC10),
        ),
        Matrix(
            "cpu-bf16-swept",
            "FRePo at IPC 1 under the precision policy with the changes a 7-minute sweep ranked high on the validation "
            "split (MNIST: lr 1e-2, real batch 256; Fashion-MNIST: real batch 256), 28-minute TimeBudget",
            (
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_lr1e-2.yaml", CPU_BF16_SWEPT_BUDGET),
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_b256.yaml", CPU_BF16_SWEPT_BUDGET),
                Cell("recipes/frepo/fashion_mnist_ipc1_cpu_bf16_b256.yaml", CPU_BF16_SWEPT_BUDGET),
            ),
        ),
        Matrix(
            "cpu-bf16-paper-eval",
            "FRePo on MNIST at IPC 1 under the precision policy, changes against the curves' early peak (an EMA of "
            "the set; pool networks kept 300 online steps; the learned labels at their own, slower rate), scored with "
            "the paper's krr network (width 128)",
            (
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_ema.yaml", CPU_BF16_PAPER_EVAL_BUDGET),
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_online300.yaml", CPU_BF16_PAPER_EVAL_BUDGET),
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_lablr1e-3.yaml", CPU_BF16_PAPER_EVAL_BUDGET),
                Cell("recipes/frepo/mnist_ipc1_cpu_bf16_lablr3e-4.yaml", CPU_BF16_PAPER_EVAL_BUDGET),
            ),
        ),
        Matrix(
            "cpu-paper-lr",
            "FRePo on MNIST and Fashion-MNIST at IPC 1, the CPU recipes at the paper's lr 3e-4, 30 minutes per cell",
            _cells("frepo", ["mnist", "fashion_mnist"], [1], "_cpu", CPU_BUDGET),
        ),
        Matrix(
            "gpu",
            "FRePo and RCIG (and random real) on MNIST and CIFAR-10 at IPC 1, 10 and 50, the published recipes, "
            "an hour per cell",
            _cells("frepo", ["mnist", "cifar10"], [1, 10, 50], "", GPU_BUDGET)
            + _cells("rcig", ["mnist", "cifar10"], [1, 10, 50], "", GPU_BUDGET),
        ),
        Matrix(
            "memories-cpu",
            "addressable memories on MNIST and Fashion-MNIST at budgets 1 and 10, 30 minutes per cell: MemoriesBPTT on "
            "memories and on pixels (plain BPTT), FRePo on memories (random real at the same budget inside each cell)",
            _cells("memories", ["mnist", "fashion_mnist"], [1, 10], "_cpu", MEMORIES_CPU_BUDGET)
            + _cells("memories", ["mnist", "fashion_mnist"], [1, 10], "_pixels_cpu", MEMORIES_CPU_BUDGET)
            + _cells("frepo", ["mnist", "fashion_mnist"], [1, 10], "_memories_cpu", MEMORIES_CPU_BUDGET),
        ),
        Matrix(
            "memories-gpu",
            "MemoriesBPTT on memories, CIFAR-10 budget 1, the official settings (paper 66.4), an hour",
            (Cell("recipes/memories/cifar10_ipc1.yaml", GPU_BUDGET),),
        ),
        Matrix(
            "smoke",
            "one cell (FRePo, MNIST, IPC 1, CPU recipe) with tiny budgets: checks the plumbing, not the numbers",
            (Cell("recipes/frepo/mnist_ipc1_cpu.yaml", SMOKE_BUDGET),),
        ),
    ]
}
