"""One APM cell under a budget, teacher pool included: build (or find) the teachers, distil, score under apm/dc/krr.

    python benchmarks/apm_cell.py recipes/apm/mnist_ipc10_cpu.yaml --minutes 30 --repeats 2 \
        --krr-arch-kwargs '{"width": 64}' --reference-epochs 10 [--data.init_args.root=DIR ...]

The cell's wall clock (``--minutes``) holds the teacher pool and the distillation: the pool is built first (or found in
the cache: ``lightning-distill teachers``, timed and reported on its own), then the distillation gets what is left
(``trainer.max_time``). The distilled set (its images and the label teacher's logits) and random real images at the
same IPC are scored under:

* ``apm`` (or ``--apm-protocol``): L1 on teacher logits; random real gets the same teacher's logits on its images;
* ``dc``: cross-entropy on classes (the logits' argmax for the distilled set; class ids for random real);
* ``krr``: MSE on the stored labels (logits for the distilled set, centred one-hot for random real).

``--reference-epochs E`` also trains one network of the ``dc`` protocol's architecture (ConvNet width 128, instance
norm) on the full training split with the ``dc`` protocol's augmentation (DSA), chosen on the validation split: its
test accuracy is the full-data reference row. The pool's own test accuracies are reported too (reported only).

Writes ``benchmarks/results/apm_<recipe stem>.{json,md}`` stamped with date, hardware, torch version and commit; the
JSON has the keys of ``distill_cell.py``'s (so ``suite.py`` lists its krr and dc numbers) plus ``apm``, ``teachers``
and ``reference``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_cell import Snapshots  # noqa: E402
from stamp import finish, pm, score_set, stamp, trainer_args  # noqa: E402

from lightning_distill.cli import cli_main  # noqa: E402
from lightning_distill.eval import NO_FLIP_DATASETS  # noqa: E402
from lightning_distill.export import load_distilled  # noqa: E402
from lightning_distill.io import atomic_path  # noqa: E402
from lightning_distill.runtime import tune_cpu_allocator  # noqa: E402
from lightning_distill.synthetic import select_real  # noqa: E402

# Random real images under the DC protocol (Zhao et al., ICLR 2021, Table 1), as in distill_cell.py.
RANDOM_PAPER = {"mnist": {1: (64.9, 3.5), 10: (95.1, 0.9)}, "fashion_mnist": {1: (51.4, 3.8), 10: (73.8, 0.7)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--minutes", type=float, default=30.0, help="wall clock of teachers + distillation")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    p.add_argument("--repeats", type=int, default=5, help="networks per evaluation")
    p.add_argument("--random-repeats", type=int, default=None, help="networks per evaluation of random real")
    p.add_argument("--apm-protocol", default="apm", help="the recipe's apm protocol (apm, apm_lr0.02, ...)")
    p.add_argument("--apm-epochs", type=int, default=None, help="override the apm protocol's 1000 epochs")
    p.add_argument("--dc-epochs", type=int, default=None, help="override the dc protocol's 1000 epochs")
    p.add_argument("--krr-arch-kwargs", default=None, help="JSON options of the krr evaluation network")
    p.add_argument("--protocols", default="apm,dc,krr", help="which protocols to score (comma-separated)")
    p.add_argument("--eval-steps", type=int, default=None, help="override every protocol's steps (smoke tests)")
    p.add_argument("--curve", type=int, default=0, help="score this many snapshots (1 net, apm) for a curve")
    p.add_argument("--curve-minutes", type=float, default=None, help="spread them over this long (default: all)")
    p.add_argument("--reference-epochs", type=int, default=0, help="train the full-data reference network (0: no)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=None)
    # Any other option goes to the recipe, as in `lightning-distill fit` (e.g. --data.init_args.root=DIR).
    a, rest = p.parse_known_args()
    a.overrides = [x for x in rest if x != "--"]
    tune_cpu_allocator()
    if a.threads:
        torch.set_num_threads(a.threads)
    stem = f"apm_{Path(a.recipe).stem}"
    out = Path(a.out or Path(__file__).resolve().parent / "results")
    run_dir = Path("runs/bench") / stem
    krr_kwargs = json.loads(a.krr_arch_kwargs) if a.krr_arch_kwargs else None
    protocols = [s.strip() for s in a.protocols.split(",") if s.strip()]
    budget_start = time.perf_counter()

    # 1. The teacher pool: built (or found) first, timed on its own.
    from lightning_distill.teachers_command import teachers_main

    teacher_args = ["--config", a.recipe, "--no-progress", *a.overrides]
    if a.max_steps:
        teacher_args.append(f"--trainer.max_steps={a.max_steps}")
    pool_summary = teachers_main(teacher_args)
    teacher_s = time.perf_counter() - budget_start

    # 2. Distillation in what is left of the budget.
    left = a.minutes * 60 - (time.perf_counter() - budget_start) - 60  # a minute for start-up and export
    args = ["--config", a.recipe, *trainer_args(run_dir, max(60.0, left)), *a.overrides]
    if a.max_steps:
        args.append(f"--trainer.max_steps={a.max_steps}")
    t0 = time.perf_counter()
    cli = cli_main(args, run=False)
    span = a.curve_minutes or left / 60  # a run that stops at max_steps before its time is up says how long it takes
    snaps = Snapshots(run_dir / "snapshots", span / (a.curve + 1), a.curve) if a.curve else None
    if snaps:
        cli.trainer.callbacks.append(snaps)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    distil_s = time.perf_counter() - t0
    cell_s = time.perf_counter() - budget_start
    method, dm, steps = cli.model, cli.datamodule, cli.trainer.global_step
    dataset, ipc, k = dm.name, method.synthetic.ipc, dm.num_classes
    flip = dataset not in NO_FLIP_DATASETS
    view = method.distilled_view()  # images and the label teacher's logits
    x_syn, logits_syn = view.images.cpu(), view.labels.cpu()
    gen = torch.Generator().manual_seed(0)
    x_rand = select_real(dm.x_train.cpu(), dm.y_train.cpu(), k, ipc, gen)
    y_rand = torch.arange(k).repeat_interleave(ipc)
    logits_rand = method.pool.logits(method.label_teacher, x_rand).cpu()
    x_te, y_te = dm.x_test.cpu(), dm.y_test.cpu()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def score(x: torch.Tensor, y: torch.Tensor, protocol: str, repeats: int) -> dict[str, Any]:
        epochs = {"dc": a.dc_epochs}.get(protocol, a.apm_epochs if protocol.startswith("apm") else None)
        return score_set(
            x, y, x_te, y_te, protocol, repeats=repeats, num_classes=k, flip=flip, epochs=epochs, steps=a.eval_steps,
            arch_kwargs=krr_kwargs if protocol == "krr" else None,
        )  # fmt: skip

    print(
        f"teachers {teacher_s / 60:.1f} min, distilled {steps} steps in {distil_s / 60:.1f} min; evaluating", flush=True
    )
    res: dict[str, Any] = {
        "recipe": a.recipe,
        "method": type(method).__name__,
        "dataset": dataset,
        "ipc": ipc,
        "steps": steps,
        "max_steps": cli.trainer.max_steps,
        "horizon": method.config()["horizon"],  # the step horizon and how it was chosen (a TimeBudget says)
        "distill_minutes": distil_s / 60,
        "teacher_minutes": teacher_s / 60,
        "cell_minutes": cell_s / 60,
        "ms_per_step": 1000 * distil_s / max(steps, 1),
        "skipped_steps": method.skipped_steps,
        "stamp": stamp(),
        "paper": None,  # APM reports no MNIST/Fashion-MNIST numbers
        "random_paper_dc": RANDOM_PAPER.get(dataset, {}).get(ipc),
        "teachers": {k_: v for k_, v in pool_summary.items()},
        "label_teacher": method.label_teacher,
        "label_storage": dict(view.storage),
        "distilled": {},
        "random": {},
        "curve": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{stem}.partial.json"

    def checkpoint() -> None:
        with atomic_path(partial) as tmp:
            tmp.write_text(json.dumps(res, indent=2))

    random_repeats = a.repeats if a.random_repeats is None else a.random_repeats
    for proto in protocols:
        name = a.apm_protocol if proto == "apm" else proto
        key = "apm" if proto == "apm" else proto
        res["distilled"][key] = score(x_syn, logits_syn, name, a.repeats)
        checkpoint()
        res["random"][key] = score(x_rand, logits_rand if proto == "apm" else y_rand, name, random_repeats)
        checkpoint()
    # The curve: snapshots of the set (with their label teacher's logits) under the apm protocol, 1 net each.
    for snap in snaps.taken if snaps else []:
        payload = load_distilled(snap["path"])
        r = score(payload["images"], payload["labels"], a.apm_protocol, 1)
        res["curve"].append({**snap, "apm_acc": r["mean"]})
        checkpoint()
    if a.reference_epochs:
        from lightning_distill.components.teachers import TeacherSpec, train_teacher
        from lightning_distill.eval import get_protocol

        dc = get_protocol("dc")
        spec = TeacherSpec(arch=dc.arch, arch_kwargs=dict(dc.arch_kwargs), num_teachers=1, epochs=a.reference_epochs)
        t = time.perf_counter()
        _, record = train_teacher(dm, spec, 0, device=device)
        res["reference"] = {
            **record,
            "arch": dc.arch,
            "arch_kwargs": dict(dc.arch_kwargs),
            "minutes": (time.perf_counter() - t) / 60,
        }
        print(f"  full-data reference: test {record['test_acc']:.2f} %", flush=True)
    finish(out, stem, res, markdown)


def markdown(r: dict[str, Any]) -> str:
    s, t = r["stamp"], r["teachers"]
    rp = f"{r['random_paper_dc'][0]} ± {r['random_paper_dc'][1]} (dc)" if r["random_paper_dc"] else "–"
    test = "–" if t.get("test_acc") is None else f"{t['test_acc']:.2f} %"
    lines = [
        f"## APM · {r['dataset']} · IPC {r['ipc']} (`{r['recipe']}`)",
        "",
        f"Cell {r['cell_minutes']:.1f} min: teacher pool {r['teacher_minutes']:.1f} min ({t['teachers']} x "
        f"{t.get('arch')} {t.get('arch_kwargs') or ''}, {t['seconds'] / 60:.1f} min of training in all, mean test "
        f"{test}, reported only), distillation {r['steps']} steps in {r['distill_minutes']:.1f} min "
        f"({r['ms_per_step']:.0f} ms/step), {r['skipped_steps']} skipped. Labels: teacher {r['label_teacher']}'s "
        f"logits, {r['label_storage'].get('label_floats')} floats beside {r['label_storage'].get('floats')} of "
        f"images. {s['date']}, {s['hardware']}, torch {s['torch']}, commit {s['commit']}.",
        "",
        "| set | apm protocol | dc protocol | krr protocol | paper |",
        "|---|---|---|---|---|",
        f"| APM (ours) | {pm(r['distilled'].get('apm'))} | {pm(r['distilled'].get('dc'))} | "
        f"{pm(r['distilled'].get('krr'))} | – (APM reports none) |",
        f"| random real (ours; apm: the same teacher's logits) | {pm(r['random'].get('apm'))} | "
        f"{pm(r['random'].get('dc'))} | {pm(r['random'].get('krr'))} | {rp} |",
    ]
    if r.get("reference"):
        ref = r["reference"]
        lines += [
            f"| full training set (one {ref['arch']} {ref['arch_kwargs']}, {ref['epochs']} epochs, DSA, "
            f"chosen on validation) | | {ref['test_acc']:.2f} | | |"
        ]
    lines += ["", "Networks per evaluation and their settings are in the JSON (`extra` of each result).", ""]
    lines += [
        f"- after {c['minutes']:.1f} min (step {c['step']}): apm {c['apm_acc']:.1f} % (1 net)"
        for c in r.get("curve", [])
    ]
    if r.get("curve"):
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
