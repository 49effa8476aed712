"""Milliseconds per FRePo outer step (meta-step + pool update) at IPC 1/10/50 on 28 px grey and 32 px RGB inputs.

    python benchmarks/frepo_speed.py --steps 5 [--configs official cpu] [--device cuda]

Random inputs of the right shape (speed does not depend on pixel values). Each timed step is the same work as one
``training_step``: pool features of the real batch, features of the synthetic set with gradient, the KRR solve,
backward, the outer optimiser step and the online step of the pool model. Writes
``benchmarks/results/frepo_speed.{json,md}`` stamped with date, hardware, torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp  # noqa: E402

from lightning_distill.components.model_pool import ModelPool  # noqa: E402
from lightning_distill.methods import FRePo  # noqa: E402
from lightning_distill.nets import get_net  # noqa: E402
from lightning_distill.optim import LAMB  # noqa: E402
from lightning_distill.synthetic import PixelSet  # noqa: E402

CONFIGS = {
    "official": {"arch_kwargs": {}, "real_batch": 1024},  # convnet_frepo 128/256/512, real batch 1024
    "cpu": {"arch_kwargs": {"width": 64}, "real_batch": 256},  # the CPU recipes' choice
}
SHAPES = {"28px grey": (1, 28, 28), "32px RGB": (3, 32, 32)}


def time_steps(config: str, shape: tuple[int, int, int], ipc: int, steps: int, device: str) -> list[float]:
    cfg = CONFIGS[config]
    k = 10
    m = FRePo(
        synthetic=PixelSet(ipc=ipc, num_classes=k, image_shape=shape, labels="learned"), arch_kwargs=cfg["arch_kwargs"]
    )
    m.synthetic.to(device)
    m.pool = ModelPool(lambda: get_net("convnet_frepo", shape[0], k, shape[1], **cfg["arch_kwargs"]), size=10).to(
        device
    )
    opt = LAMB(m.synthetic.parameters(), lr=3e-4)
    x_real = torch.randn(cfg["real_batch"], *shape, device=device)
    y_real = torch.randint(0, k, (cfg["real_batch"],), device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad()
        step = m.outer_loss(*m.synthetic(), x_real, y_real)
        step.loss.backward()
        opt.step()
        m.after_outer_step(x_real, y_real)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--configs", nargs="+", default=["official", "cpu"], choices=sorted(CONFIGS))
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    rows = []
    for config in a.configs:
        for shape_name, shape in SHAPES.items():
            for ipc in a.ipcs:
                t = time_steps(config, shape, ipc, a.steps, a.device)
                rows.append(
                    {"config": config, "input": shape_name, "ipc": ipc, "median_ms": statistics.median(t), "all_ms": t}
                )
                print(f"{config:9s} {shape_name:10s} IPC {ipc:3d}: {statistics.median(t):8.0f} ms/step", flush=True)
    s = stamp()
    res = {"stamp": s, "device": a.device, "steps": a.steps, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frepo_speed.json").write_text(json.dumps(res, indent=2))
    lines = [
        "## FRePo: milliseconds per outer step (median)",
        "",
        f"{s['date']}, {s['hardware']}, device {a.device}, torch {s['torch']}, commit {s['commit']}; "
        f"median of {a.steps} steps after one warm-up. official = convnet_frepo 128/256/512 with real batch 1024; "
        "cpu = width 64 with real batch 256 (the CPU recipes).",
        "",
        "| config | input | IPC 1 | IPC 10 | IPC 50 |",
        "|---|---|---|---|---|",
    ]
    for config in a.configs:
        for shape_name in SHAPES:
            cells = {
                r["ipc"]: f"{r['median_ms']:.0f}" for r in rows if r["config"] == config and r["input"] == shape_name
            }
            lines.append(f"| {config} | {shape_name} | " + " | ".join(cells.get(i, "–") for i in (1, 10, 50)) + " |")
    (out / "frepo_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
