"""APM's memory knob, measured: peak memory of one image update against the set size and against the chunk size.

    python benchmarks/apm_memory.py                                  # CPU sweep, width-32 ConvNets (minutes)
    python benchmarks/apm_memory.py --device cuda --width 128        # on a GPU: accelerator memory, set on the CPU
    python benchmarks/apm_memory.py --device cuda --width 128 --paper # + CIFAR-10 IPC 50 as APM runs it

One outer update of APM (:func:`~lightning_distill.functional.apm.apm_gradients`, the code the method runs): a
teacher and K=5 student checkpoints (ConvNet, instance norm, CIFAR shape 3x32x32, 10 classes; random weights, which
do not change memory or time) evaluated on every image of the set, chunk by chunk, the set and its gradient on the
CPU. Two sweeps: the number of synthetic images ``--sizes`` at a fixed ``--chunk``, and the chunk ``--chunks`` at a
fixed ``--chunk-set`` images. Each point is a fresh subprocess, so its peak is its own:

* on CUDA: ``torch.cuda.max_memory_allocated`` above the state before the update (networks loaded, set on the CPU);
* on the CPU: the growth of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over the state before the update. Networks and set then share the host memory, so the set-side buffers of the
  update (the touched images, their gradient, the set's gradient: 3 x N images of floats) are reported apart and
  subtracted: ``network working memory`` is what the knob bounds.

Memory is measured on the second update (the first pays one-time allocations), with glibc's default allocator
settings; time per outer step is the mean of ``--repeats`` further updates under the tuned allocator.
``--paper`` adds APM's CIFAR-10 IPC 50 setting (500 images, one chunk, width 128) with the time of one student
retrain (250 + 1 epochs on 500 images) and the amortised time per iteration (a retrain every 3 iterations).

Writes ``benchmarks/results/apm_memory_<device>.{json,md}`` stamped with date, hardware (``lscpu`` model name),
torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import stamp, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: ``a.n`` images, chunks of ``a.chunk``."""
    from lightning_distill.functional.apm import apm_gradients, stack_checkpoints, stacked_logits
    from lightning_distill.nets import get_net, seeded_net
    from lightning_distill.runtime import tune_cpu_allocator

    # glibc's defaults while memory is measured: freed blocks go back to the OS, so a warmed-up process's resident set
    # falls back between updates and the peak of one update is its own (the tuned allocator keeps the peak resident).
    tune_cpu_allocator(False)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    classes, shape, k = 10, (3, 32, 32), 5

    def build() -> torch.nn.Module:
        return get_net("convnet", 3, classes, 32, width=a.width)

    teacher = seeded_net(build, 1000).to(device).eval().requires_grad_(False)
    template = build().eval().requires_grad_(False)
    states = [seeded_net(build, i).state_dict() for i in range(k)]
    params, buffers = stack_checkpoints(template, states, device=device)
    template.to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(a.n, *shape, generator=g).requires_grad_(True)  # the set, on the CPU
    y = torch.arange(a.n) % classes
    index = torch.arange(a.n)

    def update() -> list[torch.Tensor | None]:
        grads, _ = apm_gradients(
            lambda idx: images[idx],
            [images],
            index,
            y,
            teacher,
            lambda x: stacked_logits(template, params, buffers, x),
            0.1,
            chunk_size=a.chunk,
            device=device,
        )
        return grads

    set_side = 3 * images.numel() * images.element_size()  # touched images, their gradient, the set's gradient
    update()  # warm-up: one-time allocations (kernels, vmap) are not the update's
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = update()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        network = peak  # the set lives on the CPU: everything here is the networks' working memory
    else:
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): run on Linux")
        base = _status_kib("VmRSS") * 1024
        grads = update()
        peak = _status_kib("VmHWM") * 1024 - base
        network = peak - set_side
    del grads
    tune_cpu_allocator()  # timed as the lightning-distill command runs
    update()
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "n": a.n,
        "chunk": a.chunk,
        "peak_mb": peak / 2**20,
        "set_side_mb": set_side / 2**20,
        "network_mb": network / 2**20,
        "seconds_per_update": sum(times) / len(times),
    }
    if a.student_epochs:
        from lightning_distill.eval.apm_protocol import apm_student_protocol
        from lightning_distill.eval.protocols import make_augment
        from lightning_distill.eval.train import train_network

        batch = min(256, a.n)
        per_epoch = -(-a.n // batch)
        protocol = apm_student_protocol("convnet", {"width": a.width}, 0.02, a.student_epochs + 1, batch)
        net = seeded_net(build, 7).to(device)
        x, z = images.detach().to(device), torch.randn(a.n, classes, device=device)
        start = time.perf_counter()
        train_network(
            net, x, z, protocol, (a.student_epochs + 1) * per_epoch, classes, g, make_augment(protocol, True).to(device)
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["student_seconds"] = time.perf_counter() - start
        out["seconds_per_iteration"] = out["seconds_per_update"] + out["student_seconds"] / 3
    return out


def run_point(a: argparse.Namespace, n: int, chunk: int | None, student_epochs: int = 0) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--n",
        str(n),
        "--device",
        a.device,
        "--width",
        str(a.width),
        "--threads",
        str(a.threads),
        "--repeats",
        str(a.repeats),
        "--student-epochs",
        str(student_epochs),
    ]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"n": n, "chunk": chunk, "error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flatness(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return (max(vals) - min(vals)) / min(vals) if vals and min(vals) > 0 else None


def markdown(r: dict[str, Any]) -> str:
    s = r["stamp"]
    lines = [
        f"## APM memory knob ({r['device']}, ConvNet width {r['width']}, K=5 checkpoints + teacher, CIFAR shape)",
        "",
        f"{s['date']}, {s['hardware']} (lscpu: {r['lscpu_model']}), torch {s['torch']}, commit {s['commit']}; "
        f"{r['threads']} thread(s). One image update of all N images; set and its gradient on the CPU.",
        "",
        f"### Peak memory against the number of synthetic images (chunk {r['chunk']})",
        "",
        "| images | peak (MB) | set-side buffers (MB) | network working memory (MB) | s / update |",
        "|---|---|---|---|---|",
    ]

    def row(x: dict[str, Any], first: str) -> str:
        if "error" in x:
            return f"| {first} | failed: {x['error']} | | | |"
        return (
            f"| {first} | {x['peak_mb']:.1f} | {x['set_side_mb']:.1f} | {x['network_mb']:.1f} | "
            f"{x['seconds_per_update']:.3f} |"
        )

    lines += [row(x, str(x["n"])) for x in r["by_size"]] or ["| (not run) | | | | |"]
    flat = r.get("size_spread_network")
    if flat is not None:
        lines += ["", f"Network working memory spread over the sizes: {100 * flat:.1f} % (target: within 10 %)."]
    lines += [
        "",
        f"### Peak memory against the chunk size ({r['chunk_set']} images)",
        "",
        "| chunk | peak (MB) | set-side buffers (MB) | network working memory (MB) | s / update |",
        "|---|---|---|---|---|",
    ]
    lines += [row(x, str(x["chunk"])) for x in r["by_chunk"]] or ["| (not run) | | | | |"]
    if r.get("paper"):
        p = r["paper"]
        lines += ["", "### APM's CIFAR-10 IPC 50 setting (500 images, one chunk)", ""]
        if "error" in p:
            lines.append(f"failed: {p['error']}")
        else:
            lines.append(
                f"peak {p['peak_mb']:.0f} MB, {p['seconds_per_update']:.3f} s per image update, "
                f"{p.get('student_seconds', float('nan')):.1f} s per student retrain (251 epochs), "
                f"{p.get('seconds_per_iteration', float('nan')):.2f} s per iteration amortised. APM's README gives "
                "memory/time only for ImageNet-1K IPC 50 (about 6.5 GB and 18 s per iteration at Segment-100)."
            )
    return "\n".join(lines) + "\n"


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    for line in out.splitlines():
        if line.strip().startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (APM: 128)")
    p.add_argument("--sizes", default="100,200,500,1000,2000", help="synthetic images, at --chunk")
    p.add_argument("--chunk", type=int, default=100, help="chunk (update_syn) of the size sweep")
    p.add_argument("--chunks", default="25,50,100,200,500", help="chunks of the chunk sweep")
    p.add_argument("--chunk-set", type=int, default=500, help="images of the chunk sweep")
    p.add_argument("--repeats", type=int, default=2, help="timed updates per point (after the measured one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paper", action="store_true", help="add APM's CIFAR-10 IPC 50 setting (500 images, one chunk)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="file stem of the results (default apm_memory_<device>)")
    # worker mode (one point in a fresh process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--student-epochs", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.chunk = a.chunk if "--chunk" in sys.argv else None
        print(json.dumps(worker(a)))
        return
    sizes = [int(s) for s in a.sizes.split(",") if s]
    chunks = [int(s) for s in a.chunks.split(",") if s]
    res: dict[str, Any] = {
        "device": a.device,
        "width": a.width,
        "threads": a.threads,
        "chunk": a.chunk,
        "chunk_set": a.chunk_set,
        "stamp": stamp(),
        "lscpu_model": lscpu_model(),
    }
    res["by_size"] = []
    for n in sizes:
        res["by_size"].append(run_point(a, n, a.chunk))
        print(res["by_size"][-1], flush=True)
    res["by_chunk"] = []
    for c in chunks:
        res["by_chunk"].append(run_point(a, a.chunk_set, c))
        print(res["by_chunk"][-1], flush=True)
    res["size_spread_network"] = _flatness(res["by_size"], "network_mb")
    res["size_spread_peak"] = _flatness(res["by_size"], "peak_mb")
    if a.paper:
        res["paper"] = run_point(a, 500, None, student_epochs=250)
        print(res["paper"], flush=True)
    # "rows": a table of its own, which the suite's report leaves to this file's .md.
    res["rows"] = res["by_size"] + res["by_chunk"] + ([res["paper"]] if a.paper else [])
    out = Path(a.out) if a.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"apm_memory_{a.device.split(':')[0]}"
    write_result(out / f"{stem}.json", json.dumps(res, indent=2))
    write_result(out / f"{stem}.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
