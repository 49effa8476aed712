"""Does ``torch.compile`` pay on FRePo's feature pass? Eager against compiled, fp32 and bf16, measured interleaved.

    python benchmarks/compile_trial.py --threads 1 --out benchmarks/results/compile_trial_cpu

The pass is the one :class:`lightning_distill.components.ModelPool` runs for FRePo's outer step, through the same
``functional_call`` on the pool's parameter dict and under the same precision helpers:

* ``real``: features of the real batch without gradient (eval-mode BatchNorm), the larger share of the FLOPs;
* ``support``: features of the synthetic set with a gradient to the images (forward + backward of a fixed
  projection), the differentiable part.

Each configuration is compiled once (``torch.compile(dynamic=False)``, inductor unless ``--backend``, default
mode), the compile time is reported on its own, then eager and compiled repetitions alternate, so a load change on
a shared machine hits both alike; the figure is the median. The compiled result is checked against eager (max
relative difference). ``--steps N`` also times FRePo's whole outer step both ways (speed.py's configuration).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stamp import finish_at, started  # noqa: E402

from lightning_distill.nets import get_net  # noqa: E402
from lightning_distill.precision import PrecisionPolicy, bf16_probe  # noqa: E402


def _pass_fns(width: int, ipc: int, real_batch: int, dtype: str) -> tuple[Callable[..., Tensor], dict, tuple]:
    """The pool's pass for one configuration (a fresh net under the policy), its tensors and the two inputs."""
    torch.manual_seed(0)
    net = get_net("convnet_frepo", 1, 10, 28, width=width).eval()
    policy = PrecisionPolicy(dtype).bind("cpu")
    policy.module(net)
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    tensors = {k: v.detach() for k, v in tensors.items()}
    x_real = torch.randn(real_batch, 1, 28, 28)
    x_syn = torch.randn(10 * ipc, 1, 28, 28, requires_grad=True)

    def core(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return policy.call(lambda x: functional_call(net, t, (x,), {"features_only": True}), x)

    return core, tensors, (x_real, x_syn)


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def trial(width: int, ipc: int, real_batch: int, dtype: str, repeats: int, backend: str = "inductor") -> dict[str, Any]:
    core, tensors, (x_real, x_syn) = _pass_fns(width, ipc, real_batch, dtype)
    compiled = torch.compile(core, dynamic=False, backend=backend)
    proj = torch.randn(core(tensors, x_syn[:1]).shape[1], 7)

    def real(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.no_grad():
                return fn(tensors, x_real)

        return run

    def support(fn: Callable[..., Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            x_syn.grad = None
            (fn(tensors, x_syn) @ proj).square().sum().backward()
            return x_syn.grad.clone()

        return run

    row: dict[str, Any] = {"width": width, "ipc": ipc, "real_batch": real_batch, "precision": dtype}
    for name, make in (("real", real), ("support", support)):
        eager_fn, comp_fn = make(core), make(compiled)
        compile_s = _time(comp_fn)  # the first call compiles
        ref, got = eager_fn(), comp_fn()
        rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        eager_fn()
        t_eager, t_comp = [], []
        for _ in range(repeats):
            t_eager.append(_time(eager_fn))
            t_comp.append(_time(comp_fn))
        e, c = statistics.median(t_eager) * 1e3, statistics.median(t_comp) * 1e3
        row[name] = {
            "eager_ms": round(e, 1),
            "compiled_ms": round(c, 1),
            "speedup": round(e / c, 3),
            "compile_s": round(compile_s, 1),
            "max_rel_diff": rel,
        }
        print(
            f"width {width} ipc {ipc} {dtype} {name}: eager {e:.1f} ms, compiled {c:.1f} ms ({e / c:.2f}x), "
            f"compile {compile_s:.1f} s, max rel diff {rel:.1e}",
            flush=True,
        )
    return row


def whole_steps(ipc: int, dtype: str, steps: int, profile: str, profile_top: int = 0) -> dict[str, Any]:
    """FRePo's whole outer step (speed.py's configuration ``profile``) with and without compiled features, interleaved.

    The first step of each variant (the compiled one compiles its graphs there) is timed apart as the start-up cost.
    """
    import speed

    configs = {}
    for compiled in (False, True):
        cfg = speed.Configuration("FRePo", speed.SHAPES["28px grey"], ipc, "cpu", profile, dtype)
        cfg.method.pool.compile_features = compiled
        configs[compiled] = (cfg, cfg.timed_step())
    speed.alternate([cfg for cfg, _first in configs.values()], steps)
    (eager, first_eager), (comp, first_comp) = configs[False], configs[True]
    row = {
        "ipc": ipc,
        "precision": dtype,
        "profile": profile,
        "real_batch": eager.batch,
        "eager_ms": round(statistics.median(eager.times), 1),
        "compiled_ms": round(statistics.median(comp.times), 1),
        "speedup": round(speed.paired_speedup(eager, comp), 3),
        "first_step_s": {"eager": round(first_eager / 1e3, 1), "compiled": round(first_comp / 1e3, 1)},
    }
    if profile_top:  # where one more step of each goes (speed.py's torch.profiler summary)
        row["profile"] = {"eager": eager.profile(profile_top), "compiled": comp.profile(profile_top)}
    print(
        f"FRePo step ipc {ipc} {dtype} ({profile}): eager {row['eager_ms']} ms, compiled {row['compiled_ms']} ms "
        f"({row['speedup']:.2f}x paired), first step {row['first_step_s']}",
        flush=True,
    )
    return row


def markdown(res: dict[str, Any]) -> str:
    s = res["stamp"]
    lines = [
        "# torch.compile on FRePo's feature pass",
        "",
        f"{s['date']}, {s['hardware']}, torch {s['torch']}, commit {s['commit']}. "
        f"`python benchmarks/compile_trial.py {' '.join(res['argv'])}`. bf16 probe: {res['bf16_probe']}.",
        *(
            [
                "",
                f"Feature passes, compiled with backend `{res['backend']}`: median of {res['repeats']} repetitions, "
                "eager and compiled alternating. `real`: features of the real batch, no gradient; `support`: features "
                "of the synthetic set, forward + backward to the images. Compile time: the first call (not in the "
                "median).",
            ]
            if res["rows"]
            else []
        ),
        "",
        *([f"Note: {res['note']}", ""] if res.get("note") else []),
        *(
            [
                "| width | IPC | real batch | precision | pass | eager ms | compiled ms | speed-up | compile s "
                "| max rel diff |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            if res["rows"]
            else []
        ),
    ]
    for r in res["rows"]:
        for name in ("real", "support"):
            p = r[name]
            lines.append(
                f"| {r['width']} | {r['ipc']} | {r['real_batch']} | {r['precision']} | {name} | {p['eager_ms']} | "
                f"{p['compiled_ms']} | {p['speedup']:.2f}x | {p['compile_s']} | {p['max_rel_diff']:.1e} |"
            )
    if res.get("steps"):
        lines += [
            "",
            f"FRePo's whole outer step (speed.py profile `{res['steps'][0]['profile']}`), median of "
            f"{res['step_repeats']} steps, eager and compiled alternating; *speed-up* is the median ratio of paired "
            "steps; *first step* includes compiling.",
            "",
            "| IPC | real batch | precision | eager ms/step | compiled ms/step | speed-up "
            "| first step s (eager / compiled) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["steps"]:
            f = r["first_step_s"]
            lines.append(
                f"| {r['ipc']} | {r['real_batch']} | {r['precision']} | {r['eager_ms']} | {r['compiled_ms']} | "
                f"{r['speedup']:.2f}x | {f['eager']} / {f['compiled']} |"
            )
    for r in res.get("steps", []):
        if "profile" not in r:
            continue
        lines += [
            "",
            f"Top operators of one more step, IPC {r['ipc']}, {r['precision']} (self CPU ms, share of the step):",
            "",
            "| eager op | ms | share | compiled op | ms | share |",
            "|---|---|---|---|---|---|",
        ]
        for e, c in zip(r["profile"]["eager"], r["profile"]["compiled"], strict=False):
            lines.append(
                f"| `{e['op'][:60]}` | {e['self_cpu_ms']:.1f} | {100 * e['share']:.1f} % | `{c['op'][:60]}` | "
                f"{c['self_cpu_ms']:.1f} | {100 * c['share']:.1f} % |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[128])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--real-batch", type=int, default=1024)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="also time FRePo's whole step, this many per variant")
    parser.add_argument("--step-profile", default="official", help="speed.py profile of the whole-step timing")
    parser.add_argument("--profile-top", type=int, default=0, help="profile one more whole step: keep the top N ops")
    parser.add_argument("--skip-passes", action="store_true", help="only the whole-step timing")
    parser.add_argument(
        "--note", default="", help="a remark recorded with the results (e.g. that the machine was shared)"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: plumbing checks only)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (old ones: replaced/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe = bf16_probe("cpu")
    rows, steps = [], []
    for width in [] if args.skip_passes else args.widths:
        for ipc in args.ipcs:
            for dtype in args.precisions:
                torch._dynamo.reset()
                rows.append(trial(width, ipc, args.real_batch, dtype, args.repeats, args.backend))
    for ipc in args.ipcs if args.steps else []:
        for dtype in args.precisions:
            torch._dynamo.reset()
            steps.append(whole_steps(ipc, dtype, args.steps, args.step_profile, args.profile_top))
    res = {
        **started(argv),
        "repeats": args.repeats,
        "backend": args.backend,
        "bf16_probe": probe.reason(),
        "rows": rows,
        "steps": steps,
        "step_repeats": args.steps,
        "note": args.note,
    }
    finish_at(args.out, res, markdown)
    return res


if __name__ == "__main__":
    main()
