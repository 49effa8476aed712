"""How far a method's meta-gradient moves under bf16 network passes, at a recipe's scale: the same outer steps in
float32 and in bf16, from the same state, compared by cosine and norm ratio.

    python benchmarks/bf16_agreement.py --methods FRePo RCIG APM MemoriesBPTT --ipcs 10 --profile cpu --draws 3 \
        --data mnist --threads 1 --out benchmarks/results/bf16_agreement_amd

The unit tests bound the agreement on tiny problems (``tests/test_precision.py``, ``tests/test_unroll.py``); this
measures it where a recipe runs (speed.py's ``--profile``: ``cpu`` is the CPU recipes' networks, ``official`` the
papers'), on real images. Per method and IPC, three copies are built with speed.py's configuration from the same
initial set: one forced to float32, one to bf16 with the same seed, and the yardstick, float32 with the method's
next seed (other networks, pools, students and draws). Each *draw* is one call of ``outer_loss`` in each copy on
the draw's own real batch (the next ``real batch`` images; the first two copies' generators advance alike, so both
also draw the same fresh network, inner batches or augmentation); nothing is stepped, so every draw starts from the
same set and the same pool. Reported per meta-parameter: the cosine of the bf16 gradient with the float32 one, the
ratio of their norms (bf16 over float32), the relative difference of the outer loss, and the yardstick's cosine with
the float32 gradient (how far the method's own randomness moves a step). A method whose step trains networks first
(APM retrains its students in the first call) compares whole trainings, so its bf16 figure includes how far
rounding moves a training run.

bf16 rounding is the same arithmetic wherever it runs (8 mantissa bits per activation, float32 accumulation), so the
figures do not need bf16 hardware: on a CPU without AMX or AVX-512 bf16 oneDNN emulates it (slowly). What they
cannot show is speed (``speed.py --precision fp32,policy``) or the accuracy of a whole run's set.
"""

from __future__ import annotations

import argparse
import ast
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from stamp import finish_at, page_head, started  # noqa: E402

#: Datasets whose images are speed.py's "28px grey" input.
DATASETS = ("mnist", "fashion_mnist")


def real_data(name: str, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` training images of ``name`` as the datamodule gives them (standardised), and their labels;
    ``random``: ``n`` random images, classes in turn."""
    if name == "random":
        gen = torch.Generator().manual_seed(0)
        return torch.randn(n, *speed.SHAPES["28px grey"], generator=gen), torch.arange(n) % speed.NUM_CLASSES
    from lightning_distill.data import get_datamodule

    dm = get_datamodule(name)
    dm.prepare_data()
    dm.setup("fit")
    if len(dm.x_train) < n:
        raise SystemExit(f"{name} has {len(dm.x_train)} training images; {n} are needed: use fewer --draws")
    return dm.x_train[:n].float(), dm.y_train[:n]


def meta_gradients(cfg: speed.Configuration) -> tuple[dict[str, Tensor], float]:
    """One ``outer_loss`` call of ``cfg``'s method: its meta-gradients by name and the outer loss (nothing stepped)."""
    method = cfg.method
    x_syn, y_syn = method.synthetic() if method.materialise_set else (None, None)
    out = method.outer_loss(x_syn, y_syn, cfg.x_real, cfg.y_real)
    if out is None:
        return {}, math.nan
    if out.grads is not None:
        return {n: g.detach().float() for n, g in out.grads.items()}, float(out.logged_value)
    named = {n: p for n, p in cfg.named.items() if p.requires_grad}
    grads = torch.autograd.grad(out.loss, list(named.values()), allow_unused=True)
    return {n: g.float() for n, g in zip(named, grads, strict=True) if g is not None}, float(out.loss.detach())


def agreement(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per meta-parameter present in both: cosine of ``b`` with ``a`` and ``‖b‖ / ‖a‖``."""
    out = {}
    for name in a.keys() & b.keys():
        x, y = a[name].flatten().double(), b[name].flatten().double()
        nx, ny = float(x.norm()), float(y.norm())
        out[name] = {
            "cosine": float(x @ y) / (nx * ny) if nx and ny else math.nan,
            "norm_ratio": ny / nx if nx else math.nan,
        }
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` (VALUE a Python literal, e.g. ``inner_steps=150``) as ``(name, value)``."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"an override is NAME=VALUE (e.g. inner_steps=150), got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r}: VALUE must be a Python literal (150, 0.01, 'x')") from None


def compare(
    name: str,
    ipc: int,
    draws: int,
    device: str,
    profile: str,
    data: tuple[Tensor, Tensor],
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``draws`` outer steps of ``name`` in float32 and in bf16 from the same state; one row per (method, IPC).

    ``overrides``: attributes of the built method to set before the first draw (e.g. ``inner_steps`` for a longer
    unroll than the profile's); an attribute the method does not have is refused."""
    shape = speed.SHAPES["28px grey"]
    configs = {
        prec: speed.Configuration(name, shape, ipc, device, profile, prec, data=data) for prec in ("fp32", "bf16")
    }
    # The yardstick: float32 again with the method's next seed (other networks, pools, students and draws; the same
    # set and real batches). bf16 moving the gradient less than that is within the method's own randomness.
    configs["fp32_seed"] = speed.Configuration(
        name, shape, ipc, device, profile, "fp32", data=data, seed=configs["fp32"].method.seed + 1
    )
    for key, value in (overrides or {}).items():
        for cfg in configs.values():
            if not hasattr(cfg.method, key):
                raise SystemExit(f"--override {key}: {name} has no attribute {key!r}")
            setattr(cfg.method, key, value)
    resolved = {prec: configs[prec].method.network_precision.dtype for prec in ("fp32", "bf16")}
    if resolved != {"fp32": "fp32", "bf16": "bf16"}:
        raise SystemExit(f"{name}: precision did not take ({resolved}): it needs a precision argument")
    batch = configs["fp32"].batch
    if len(data[0]) < draws * batch:
        raise SystemExit(f"{draws} draws of {batch} real images need {draws * batch} images, got {len(data[0])}")
    per_draw = []
    for d in range(draws):
        for cfg in configs.values():
            cfg.x_real, cfg.y_real = (t[d * batch : (d + 1) * batch].to(device) for t in data)
        g32, loss32 = meta_gradients(configs["fp32"])
        g16, loss16 = meta_gradients(configs["bf16"])
        g_seed, _ = meta_gradients(configs["fp32_seed"])
        same = g32.keys() == g16.keys() and all(torch.equal(g32[n], g16[n]) for n in g32)
        per_draw.append(
            {
                "draw": d,
                "loss_fp32": loss32,
                "loss_bf16": loss16,
                "identical": same,
                "params": agreement(g32, g16),
                "seed_params": agreement(g32, g_seed),
            }
        )
        last = per_draw[-1]
        summary = ", ".join(
            f"{n} cos {v['cosine']:.4f} ratio {v['norm_ratio']:.3f} (seed {last['seed_params'][n]['cosine']:.4f})"
            for n, v in sorted(last["params"].items())
        )
        print(f"{name} IPC {ipc} draw {d}: loss {loss32:.5g} → {loss16:.5g}; {summary}", flush=True)
    return {
        "method": name,
        "ipc": ipc,
        "profile": profile,
        "overrides": dict(overrides or {}),
        "real_batch": batch,
        "draws": per_draw,
        "summary": summarise(per_draw),
        # Bitwise equal in every draw: no pass of this outer step runs in bf16 (RCIG's linearised passes and solves
        # are float32 by design; only its pool's training, which no draw steps, follows the policy).
        "identical": all(r["identical"] for r in per_draw),
        "loss_rel_diff_max": max(abs(r["loss_bf16"] - r["loss_fp32"]) / abs(r["loss_fp32"]) for r in per_draw),
    }


def summarise(per_draw: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per meta-parameter over the draws: the bf16 cosine's min and median, the norm ratio's range, and the
    yardstick's median cosine."""

    def over_draws(key: str, n: str, field: str) -> list[float]:
        return [r[key][n][field] for r in per_draw if n in r[key]]

    return {
        n: {
            "cosine_min": min(over_draws("params", n, "cosine")),
            "cosine_median": statistics.median(over_draws("params", n, "cosine")),
            "norm_ratio_min": min(over_draws("params", n, "norm_ratio")),
            "norm_ratio_max": max(over_draws("params", n, "norm_ratio")),
            "seed_cosine_median": statistics.median(over_draws("seed_params", n, "cosine")),
        }
        for n in sorted({n for r in per_draw for n in r["params"]})
    }


def markdown(res: dict[str, Any]) -> str:
    title = "bf16 against float32: the same outer steps' meta-gradients"
    lines = [
        *page_head(title, res, "bf16_agreement.py", f"; device `{res['device']}`, data `{res['data']}`"),
        f"{res['draws']} draws per row: one `outer_loss` call in a float32 copy and in a bf16 copy of the method, "
        "from the same seeds and set (speed.py's configuration), each draw on its own real batch; nothing stepped. "
        "*Cosine*: of the bf16 meta-gradient with the float32 one; *norm ratio*: bf16 over float32; *loss*: the "
        "largest relative difference of the outer loss. *Other seed*: the yardstick, the median cosine of the float32 "
        "meta-gradient with a float32 copy of the method's next seed (other networks, pools, students and draws; "
        "the same set and real batches): bf16 closer than that moves the step less than the method's own "
        "randomness does.",
        "",
        *([f"Note: {res['note']}", ""] if res.get("note") else []),
        "| method | IPC | profile | real batch | meta-parameter | bf16: cosine (min / median) | bf16: norm ratio "
        "(min – max) | bf16: loss | other seed: cosine (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        for n, s in r["summary"].items():
            cosine = (
                "identical: no pass of this outer step runs in bf16"
                if r.get("identical")
                else f"{s['cosine_min']:.4f} / {s['cosine_median']:.4f}"
            )
            profile = r["profile"] + "".join(f", {k}={v}" for k, v in r.get("overrides", {}).items())
            lines.append(
                f"| {r['method']} | {r['ipc']} | {profile} | {r['real_batch']} | `{n}` | {cosine} | "
                f"{s['norm_ratio_min']:.3f} – {s['norm_ratio_max']:.3f} | {r['loss_rel_diff_max']:.1e} | "
                f"{s['seed_cosine_median']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["FRePo", "RCIG", "APM", "MemoriesBPTT"])
    parser.add_argument("--ipcs", type=int, nargs="+", default=[10])
    parser.add_argument("--draws", type=int, default=3, help="outer_loss calls compared per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", choices=speed.PROFILES, default=None, help="default: official on GPU, cpu on CPU")
    parser.add_argument(
        "--data",
        choices=(*DATASETS, "random"),
        default="mnist",
        help="real images to initialise the set and draw the real batch from ($LIGHTNING_DISTILL_DATA), or random "
        "pixels",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--override",
        type=parse_override,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an attribute of every built method before the draws, e.g. inner_steps=150 (repeatable)",
    )
    parser.add_argument("--note", default="", help="a remark recorded with the results")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (old ones: replaced/)")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    unknown = sorted(set(args.methods) - set(speed.CONSTRUCTORS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(speed.CONSTRUCTORS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = args.profile or ("official" if args.device.startswith("cuda") else "cpu")
    # Enough images for each draw's real batch (at most 1024, the official FRePo/RCIG batch) and to initialise a set.
    data = real_data(args.data, max(1024 * args.draws, speed.NUM_CLASSES * max(args.ipcs)))
    overrides = dict(args.override)
    rows = [
        compare(name, ipc, args.draws, args.device, profile, data, overrides)
        for name in args.methods
        for ipc in args.ipcs
    ]
    res = {
        **started(argv),
        "device": args.device,
        "data": args.data,
        "draws": args.draws,
        "rows": rows,
        "note": args.note,
    }
    finish_at(args.out, res, markdown)
    if args.out is None:
        print(markdown(res))
    return res


if __name__ == "__main__":
    main()
