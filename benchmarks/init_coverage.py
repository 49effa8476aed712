"""How well a synthetic set's starting images cover each class: random real picks against k-means picks.

    python benchmarks/init_coverage.py --dataset mnist --ipcs 1 10 50 --seeds 0 1 2 \
        --out benchmarks/results/init_coverage_mnist

Before any distillation, the ``ipc`` starting images per class of ``PixelSet(init="real")`` (a random draw) and of
``init="kmeans"`` (the real images nearest k-means centres, :func:`lightning_distill.synthetic.select_kmeans`) are
scored by one cheap, training-free proxy: the accuracy of the nearest starting image (pixel space, model-input
normalisation) as a classifier of the validation images held out of the training split. It says how much of each
class the starting set spans, not what the distilled set will score; that takes a sweep (``sweep.py`` with
``--model.init_args.synthetic.init_args.init=kmeans``). Writes ``OUT.{json,md}`` and ``OUT.png`` (one seed's two
starting sets side by side), stamped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import finish_at, save_figure, stamp_line, started  # noqa: E402

from lightning_distill.data import DATASETS  # noqa: E402
from lightning_distill.synthetic import select_kmeans, select_real  # noqa: E402
from lightning_distill.viz import image_grid  # noqa: E402

SELECTORS = {"real": select_real, "kmeans": select_kmeans}


def nearest_image_accuracy(x_set: torch.Tensor, ipc: int, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Accuracy (%) of labelling each validation image with the class of its nearest set image (set in class order)."""
    nearest = torch.cdist(x_val.flatten(1), x_set.flatten(1)).argmin(1)
    return float((nearest // ipc == y_val).float().mean()) * 100


def measure(
    dm: Any, ipcs: list[int], seeds: list[int]
) -> tuple[list[dict[str, Any]], dict[tuple[int, str], torch.Tensor]]:
    """One row per (ipc, init): the proxy over ``seeds`` and the seconds each selection took; and the first seed's
    set per (ipc, init), for the picture."""
    k = dm.num_classes
    rows, first_sets = [], {}
    for ipc in ipcs:
        for init, select in SELECTORS.items():
            accs, secs = [], []
            for seed in seeds:
                t = time.perf_counter()
                x_set = select(dm.x_train, dm.y_train, k, ipc, torch.Generator().manual_seed(seed))
                secs.append(time.perf_counter() - t)
                accs.append(nearest_image_accuracy(x_set, ipc, dm.x_val, dm.y_val))
                first_sets.setdefault((ipc, init), x_set)
            rows.append(
                {
                    "ipc": ipc,
                    "init": init,
                    "accuracies": [round(a, 2) for a in accs],
                    "mean": round(statistics.mean(accs), 2),
                    "std": round(statistics.pstdev(accs), 2),
                    "seconds": round(statistics.median(secs), 2),
                }
            )
            print(f"IPC {ipc} {init}: {rows[-1]['mean']:.1f} ± {rows[-1]['std']:.1f} ({rows[-1]['seconds']} s)")
    return rows, first_sets


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"## Starting images: random real against k-means · {res['dataset']}",
        "",
        "Nearest-starting-image accuracy (%) on the validation images held out of the training split, before any "
        f"distillation, over seeds {res['seeds']} (mean ± std); selection time is the median over seeds. "
        "A proxy for how much of each class the starting set spans, not a distilled set's score.",
        "",
        "| IPC | random real | k-means | k-means selection (s) |",
        "|---|---|---|---|",
    ]
    by = {(r["ipc"], r["init"]): r for r in res["rows"]}
    for ipc in res["ipcs"]:
        real, km = by[(ipc, "real")], by[(ipc, "kmeans")]
        lines.append(
            f"| {ipc} | {real['mean']:.1f} ± {real['std']:.1f} | {km['mean']:.1f} ± {km['std']:.1f} | {km['seconds']} |"
        )
    lines += ["", f"{stamp_line(res['stamp'])}.", ""]
    return "\n".join(lines)


def picture(sets: dict[str, torch.Tensor], ipc: int, seed: int, dm: Any, res: dict[str, Any], path: Path) -> None:
    """The two starting sets (``{init: images}``) of one seed side by side, one row per class."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(2 + ipc * 0.9, 1.5 + dm.num_classes * 0.45))
    for ax, (init, x_set) in zip(axes, sets.items(), strict=True):
        ax.imshow(image_grid(x_set, ipc, dm.preprocessing).permute(1, 2, 0).numpy())
        ax.set_title(f"init: {init} (IPC {ipc}, seed {seed})", fontsize=9)
        ax.axis("off")
    save_figure(fig, path, res["stamp"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--root", default=None, help="data root (default: LIGHTNING_DISTILL_DATA, else the cache)")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md, OUT.png (old ones: replaced/)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = DATASETS[args.dataset](root=args.root, download=False)
    dm.prepare_data()
    dm.setup("fit")
    rows, first_sets = measure(dm, args.ipcs, args.seeds)
    res = {
        **started(argv),
        "dataset": args.dataset,
        "ipcs": args.ipcs,
        "seeds": args.seeds,
        "proxy": "nearest-starting-image accuracy on validation",
        "rows": rows,
    }
    # the picture at the largest IPC up to 10 (wider grids are unreadable), else the smallest asked for
    shown = max((i for i in args.ipcs if i <= 10), default=min(args.ipcs))
    sets = {init: first_sets[(shown, init)] for init in SELECTORS}
    finish_at(args.out, res, markdown, lambda r, path: picture(sets, shown, args.seeds[0], dm, r, path))
    return res


if __name__ == "__main__":
    main()
