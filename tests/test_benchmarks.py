"""benchmarks/: the suite (one smoke cell end to end, resume, report, README block), speed.py and cross_arch.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_distill.eval import EvalResult
from lightning_distill.export import load_distilled, save_distilled

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import suite  # noqa: E402
from matrices import MATRICES  # noqa: E402

THREADS = os.environ.get("LIGHTNING_DISTILL_TEST_THREADS", "2")


def _truncate_idx(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` records of an MNIST idx file (big-endian header: magic, count, then the other dims)."""
    data = src.read_bytes()
    ndim = data[3]
    dims = list(struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]))
    record = 1
    for d in dims[1:]:
        record *= d
    start = 4 + 4 * ndim
    dst.write_bytes(data[:4] + struct.pack(f">{ndim}I", n, *dims[1:]) + data[start : start + n * record])


def mnist_root(data_root: Path, dst: Path, n_train: int = 2000, n_test: int = 500) -> Path:
    """A data root holding the first real MNIST images only, in torchvision's layout.

    distill_cell.py scores every set on the whole test split with the dc protocol's width-128 network, which takes
    tens of seconds per set on one core; the first 500 test images keep the smoke cell to seconds.
    """
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            _truncate_idx(data_root / "MNIST" / "raw" / name, raw / name, n)
    return dst


def _env(data: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIGHTNING_DISTILL_DATA": str(data),
        "LIGHTNING_DISTILL_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": THREADS,
    }


def _suite(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / "suite.py"), "--out", str(tmp / "results"), "--workdir", str(tmp), *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 63 s on 2 AMD EPYC cores: the default suite stays under its 10 minutes
def test_smoke_matrix_end_to_end(data_root: Path, tmp_path: Path) -> None:
    env = _env(mnist_root(data_root, tmp_path / "data"), tmp_path / "cache")
    p = _suite(tmp_path, env, "--matrix", "smoke", "--threads", THREADS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cell = MATRICES["smoke"].cells[0]
    r = json.loads((tmp_path / "results" / f"{cell.stem}.json").read_text())
    assert (r["method"], r["dataset"], r["ipc"], r["steps"]) == ("FRePo", "mnist", 1, 2)
    assert r["budget"] == cell.budget.to_dict()
    assert len(r["distilled"]["krr"]["accuracies"]) == 1
    assert not list((tmp_path / "results").glob("*.partial.json"))  # progress file replaced by the result
    assert r["random"]["dc"]["steps"] == r["distilled"]["krr"]["steps"] == 2  # --eval-steps overrides both protocols
    assert {"date", "hardware", "torch", "commit"} <= set(r["stamp"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| mnist | 1 | FRePo |" in md and "| mnist | 1 | random real |" in md
    assert "93.0 ± 0.4 (krr)" in md and r["stamp"]["commit"] in md
    assert (tmp_path / "results" / "accuracy_vs_ipc_mnist.png").stat().st_size > 0
    assert (tmp_path / "results" / "time_per_step.png").stat().st_size > 0

    # Resume: the cell is done at this budget, so nothing runs again; another budget would re-run it.
    p = _suite(tmp_path, env, "--matrix", "smoke")
    assert p.returncode == 0 and "done (same budget), skipped" in p.stdout, p.stdout + p.stderr
    p = _suite(tmp_path, env, "--matrix", "smoke", "--repeats", "2", "--dry-run")
    assert p.returncode == 0 and p.stdout.startswith("run "), p.stdout + p.stderr

    # A cell that died while scoring: its partial result is picked up, the set scored from the run's export without
    # distilling again, and only the missing score computed.
    result = tmp_path / "results" / f"{cell.stem}.json"
    partial = result.with_name(f"{cell.stem}.partial.json")
    died = json.loads(result.read_text())
    del died["random"]["dc"], died["budget"]
    partial.write_text(json.dumps(died))
    result.unlink()
    p = _suite(tmp_path, env, "--matrix", "smoke", "--threads", THREADS)
    assert p.returncode == 0 and "without distilling again" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    again = json.loads(result.read_text())
    assert again["distilled"] == r["distilled"] and again["stamp"] == r["stamp"]  # kept, not recomputed
    assert again["random"]["dc"]["steps"] == 2 and len(again["resumed"]) == 1 and not partial.exists()
    assert "Scoring resumed" in result.with_suffix(".md").read_text()
    # Scored under other options, the partial is not resumed: it is set aside and the cell distilled anew.
    partial.write_text(json.dumps(died))
    result.unlink()
    p = _suite(tmp_path, env, "--matrix", "smoke", "--threads", THREADS, "--eval-steps", "3")
    assert p.returncode == 0 and "cannot be resumed" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed" not in json.loads(result.read_text())
    assert list((tmp_path / "results" / "replaced").glob(f"{cell.stem}.partial.*.json"))


def _cell_result(stamp: dict, **over) -> dict:
    """A distill_cell.py result in its format (numbers made up; the evaluations are real EvalResult dicts)."""

    def ev(protocol: str, arch: str, accs: list[float], steps: int, kwargs: dict) -> dict:
        return EvalResult(protocol, arch, accs, 10, steps, 1.0, {"arch_kwargs": kwargs}).to_dict()

    krr_kw = {"norm": "none", "width": 64}
    dc_kw = {"width": 128, "norm": "instance"}
    res = {
        "recipe": "recipes/frepo/mnist_ipc1_cpu.yaml",
        "method": "FRePo",
        "dataset": "mnist",
        "ipc": 1,
        "steps": 2400,
        "distill_minutes": 21.0,
        "ms_per_step": 525.0,
        "skipped_steps": 0,
        "stamp": stamp,
        "paper": [93.0, 0.4],
        "random_paper_dc": [64.9, 3.5],
        "distilled": {
            "krr": ev("krr", "convnet_frepo", [90.0] * 5, 1000, krr_kw),
            "dc": ev("dc", "convnet", [85.0] * 5, 1000, dc_kw),
        },
        "random": {
            "krr": ev("krr", "convnet_frepo", [60.0] * 5, 1000, krr_kw),
            "dc": ev("dc", "convnet", [64.0] * 5, 1000, dc_kw),
        },
        "curve": [],
    }
    res.update(over)
    return res


STAMP = {"date": "2026-01-01 00:00 UTC", "hardware": "Test CPU, 2 cores", "torch": "2.x", "commit": "abc1234"}


def test_resume_check_of_results_run_by_hand(tmp_path: Path) -> None:
    cell = MATRICES["cpu-paper-lr"].cells[0]  # frepo mnist_ipc1_cpu, CPU budget: 5 nets, krr width 64, 2400 steps
    assert cell.recipe == "recipes/frepo/mnist_ipc1_cpu.yaml"
    path = tmp_path / f"{cell.stem}.json"
    path.write_text(json.dumps(_cell_result(STAMP)))
    assert suite.cell_done(path, cell)[0]
    path.write_text(json.dumps(_cell_result(STAMP, steps=900, distill_minutes=12.0)))  # stopped early
    assert not suite.cell_done(path, cell)[0]
    path.write_text(json.dumps(_cell_result(STAMP, recipe="recipes/frepo/mnist_ipc10_cpu.yaml")))
    assert not suite.cell_done(path, cell)[0]

    # Fewer networks for random real: the budget says how many, and a result with another count is not this budget.
    one = dataclasses.replace(cell, budget=dataclasses.replace(cell.budget, random_repeats=1))
    assert "--random-repeats 1" in " ".join(one.budget.args())
    assert not suite.cell_done(path.with_name("x.json"), one)[0]
    r = _cell_result(STAMP)
    path.write_text(json.dumps(r))
    done, why = suite.cell_done(path, one)
    assert not done and "5 random-real networks, not 1" in why
    r["random"] = {k: {**v, "accuracies": v["accuracies"][:1]} for k, v in r["random"].items()}
    path.write_text(json.dumps(r))
    assert suite.cell_done(path, one)[0]

    # A recorded cosine horizon other than the budget's is another budget, even when the wall clock capped both.
    path.write_text(json.dumps(_cell_result(STAMP, steps=1538, distill_minutes=30.0, max_steps=1600)))
    done, why = suite.cell_done(path, cell)
    assert not done and "cosine horizon 1600 steps, not 2400" in why
    path.write_text(json.dumps(_cell_result(STAMP, steps=1538, distill_minutes=30.0, max_steps=2400)))
    assert suite.cell_done(path, cell)[0]


def test_resume_check_of_a_time_budget_cell(tmp_path: Path) -> None:
    """A recipe with a TimeBudget chooses its horizon and ends there, before the wall-clock cap: done, by hand too."""
    swept = MATRICES["cpu-bf16-swept"].cells
    (cell,) = [c for c in swept if c.recipe.endswith("fashion_mnist_ipc1_cpu_bf16_b256.yaml")]
    assert suite.recipe_horizon(cell.path) == -1  # the recipe leaves the horizon to its TimeBudget
    path = tmp_path / f"{cell.stem}.json"
    chosen = {"recipe": cell.recipe, "dataset": "fashion_mnist", "random": {}, "max_steps": 7501}
    path.write_text(json.dumps(_cell_result(STAMP, steps=7501, distill_minutes=27.0, **chosen)))
    done, why = suite.cell_done(path, cell)
    assert done, why
    path.write_text(json.dumps(_cell_result(STAMP, steps=5000, distill_minutes=20.0, **chosen)))  # stopped early
    done, why = suite.cell_done(path, cell)
    assert not done and "short of the budget" in why


def test_only_selects_by_recipe_path_and_rejects_no_match(tmp_path: Path) -> None:
    env = {**os.environ}
    p = _suite(tmp_path, env, "--matrix", "cpu", "--only", "frepo/mnist_ipc10", "--dry-run")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and "recipes/frepo/mnist_ipc10_cpu_lr3e-3.yaml" in lines[0]  # not fashion_mnist's
    p = _suite(tmp_path, env, "--matrix", "cpu", "--only", "cifar", "--dry-run")
    assert p.returncode != 0 and "matches no cell" in p.stderr and "mnist_ipc1_cpu_lr3e-3" in p.stderr


def test_only_with_a_recipe_name_selects_that_recipe_alone() -> None:
    cells = MATRICES["cpu-bf16-swept"].cells  # mnist_ipc1_cpu_bf16_b256 is part of fashion_mnist_ipc1_cpu_bf16_b256
    picked = [c.recipe for c in cells if suite.selects("mnist_ipc1_cpu_bf16_b256", c, cells)]
    assert picked == ["recipes/frepo/mnist_ipc1_cpu_bf16_b256.yaml"]
    assert [c.recipe for c in cells if suite.selects("mnist_ipc1_cpu_bf16_b256.yaml", c, cells)] == picked
    both = [c.recipe for c in cells if suite.selects("ipc1_cpu_bf16_b256", c, cells)]  # not a name: a substring
    assert len(both) == 2 and picked[0] in both


def test_full_data_rows_take_the_latest_stamp_not_the_latest_file(tmp_path: Path) -> None:
    """A clone gives every result the same file time: the teacher pool's row comes from the latest stamped cell."""

    def cell(name: str, date: str, acc: float, mtime: int) -> tuple[Path, dict]:
        path = tmp_path / f"{name}.json"
        path.write_text("{}")
        os.utime(path, (mtime, mtime))
        pool = {"test_acc": acc, "teachers": 2, "arch": "convnet", "arch_kwargs": {}, "seconds": 60, "folder": "t"}
        return path, {"dataset": "mnist", "stamp": {"date": date}, "teachers": pool}

    old = cell("old", "2026-12-05 20:48 UTC", 98.5, mtime=2_000_000_000)  # the newer file
    new = cell("new", "2026-12-05 21:28 UTC", 98.7, mtime=1_000_000_000)
    (row,) = suite.full_data_rows([old, new], "results")
    assert "98.70" in row and "new.md" in row


def test_report_rows_and_readme_block(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "frepo_mnist_ipc1_cpu.json").write_text(json.dumps(_cell_result(STAMP)))
    # What `lightning-distill evaluate` writes for a RandomSubset set at IPC 10 under dc.
    extra = {"arch_kwargs": {"width": 128, "norm": "instance"}, "dataset": "mnist", "ipc": 10, "method": "RandomSubset"}
    result = EvalResult("dc", "convnet", [64.0, 66.0], 100, 1000, 3.0, extra).to_dict()
    evaluated = {"stamp": {**STAMP, "commit": "def5678"}, "results": [result]}
    (out / "distilled_eval_dc.json").write_text(json.dumps(evaluated))
    # A score under a protocol with no column of its own (the memories paper's rtp) is said in the notes.
    rtp_extra = {**extra, "ipc": 1, "method": "MemoriesBPTT", "path": "runs/bench/memories_mnist_ipc1_cpu/distilled.pt"}
    rtp_extra.update(step=900, distilled_precision="fp32")
    rtp = EvalResult("rtp", "convnet", [86.0, 86.5], 290, 300, 3.0, rtp_extra).to_dict()
    (out / "memories_eval_rtp.json").write_text(json.dumps({"stamp": STAMP, "results": [rtp]}))
    # Tables of their own (rows key) are embedded, not read as results; progress files are not results at all.
    (out / "cross_arch_mnist.json").write_text(json.dumps({"stamp": STAMP, "rows": []}))
    (out / "cross_arch_mnist.md").write_text("## Cross-architecture accuracy\n\n| set | alexnet |\n")
    # continual.py's result is a section of its own (its Markdown and picture), not a table row nor "not understood".
    (out / "continual_mnist.json").write_text(json.dumps({"stamp": STAMP, "entries": []}))
    (out / "continual_mnist.md").write_text("## Class-incremental continual learning\n\n| memory | step 1 |\n")
    (out / "speed_allocator.md").write_text("## Milliseconds per outer step\n\n| FRePo | tuned (-20 %) |\n")
    (out / "x.partial.json").write_text(json.dumps(_cell_result(STAMP, ipc=50)))
    (out / "extra").mkdir()
    (out / "extra" / "README.md").write_text("# More networks\n\n| seed 2 | 97.58 |\n")
    (out / "extra" / "seed2.json").write_text(json.dumps({"stamp": STAMP, "results": []}))  # not a row
    (out / "no_readme").mkdir()
    rows, md = suite.report(out, tmp_path / "RESULTS.md")
    assert "## More networks\n\n| seed 2 | 97.58 |" in md
    assert "## Cross-architecture accuracy\n\n| set | alexnet |" in md and "| FRePo | tuned (-20 %) |" in md
    assert "Files not understood" not in md
    assert "## Class-incremental continual learning\n\n| memory | step 1 |" in md
    assert [(r.dataset, r.ipc, r.method) for r in rows] == [
        ("mnist", 1, "FRePo"),
        ("mnist", 1, "MemoriesBPTT"),
        ("mnist", 1, "random real"),
        ("mnist", 10, "random real"),
    ]
    assert "| 2 | **rtp protocol: 86.2 ± 0.2**;" in md
    # Which set, not only which method, and the precision it was distilled under.
    assert "evaluate (MemoriesBPTT) of memories_mnist_ipc1_cpu (step 900), distilled in fp32" in md
    assert "| 90.0 ± 0.0 | 85.0 ± 0.0 | 93.0 ± 0.4 (krr) | 2400 steps, 21.0 min, 525 ms/step |" in md
    assert "| mnist | 10 | random real | – | 65.0 ± 1.0 | 95.1 ± 0.9 (dc) |" in md
    assert "krr net width 64" in md and "def5678" in md and "Test CPU, 2 cores" in md
    assert (out / "accuracy_vs_ipc_mnist.png").is_file() and (out / "time_per_step.png").is_file()

    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    original = readme.read_text()
    if suite.START not in original:  # the lead adds the markers; the test must not depend on when
        original = original.replace("RESULTS_TABLE", f"{suite.START}\nold table\n{suite.END}")
        readme.write_text(original)
    old_block = original.split(suite.START)[1].split(suite.END)[0].strip()
    assert suite.update_readme(readme, rows, out)
    text = readme.read_text()
    assert old_block not in text and "| mnist | 10 | random real |" in text and "(results/frepo_mnist" in text
    assert text.split(suite.START)[0] == original.split(suite.START)[0]
    assert text.split(suite.END)[1] == original.split(suite.END)[1]
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing here\n")
    assert not suite.update_readme(no_markers, rows, out) and no_markers.read_text() == "# nothing here\n"


def test_speed_one_step_per_method(tmp_path: Path) -> None:
    import speed

    cmd = [sys.executable, str(BENCH / "speed.py"), "--steps", "1", "--ipcs", "1", "--device", "cpu"]
    cmd += ["--profile", "smoke", "--matmul-size", "256", "--threads", THREADS, "--out", str(tmp_path)]
    cmd += ["--allocator", "both", "--name", "speed_allocator"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "speed_allocator.json").read_text())
    assert res["matmul"]["gflops"] > 0 and {"date", "hardware", "torch", "commit"} <= set(res["stamp"])
    methods = speed.discover_methods()
    assert {"FRePo", "RandomSubset"} <= set(methods)
    for m in methods:
        rows = [r for r in res["rows"] if r["method"] == m]
        assert len(rows) == 4 and all("error" not in r and r["median_ms"] > 0 for r in rows), rows
        assert [r["allocator"] for r in rows] == ["default", "tuned"] * 2  # each configuration before, then after
    frepo = [r for r in res["rows"] if r["method"] == "FRePo"]
    assert all(r["flops_per_step"] > 0 and r["matmul_fraction"] > 0 for r in frepo)
    md = (tmp_path / "speed_allocator.md").read_text()
    assert "| FRePo | 28px grey | 1 | 64 | default |" in md and "| FRePo | 28px grey | 1 | 64 | tuned (" in md


def test_speed_times_emulated_bf16_on_small_matmuls(monkeypatch, capsys) -> None:
    """Without fast bf16 (faked) the bf16 rate is timed at 512², saying so; with it, or in fp32 alone, as asked."""
    import speed

    from lightning_distill.precision import Bf16Probe

    both = ("float32", "bfloat16")
    monkeypatch.setattr(speed, "bf16_probe", lambda device: Bf16Probe(str(device), ()))
    assert speed.matmul_size("cpu", 4096, both) == speed.EMULATED_BF16_MATMUL_SIZE == 512
    assert "bf16 is emulated there" in capsys.readouterr().out
    assert speed.matmul_size("cpu", 4096, ("float32",)) == 4096 and speed.matmul_size("cpu", 256, both) == 256
    monkeypatch.setattr(speed, "bf16_probe", lambda device: Bf16Probe(str(device), ("amx_bf16",)))
    assert speed.matmul_size("cpu", 4096, both) == 4096


def test_speed_default_allocator_follows_what_runs_get(tmp_path: Path) -> None:
    """Where the allocator cannot be tuned, speed.py measures the default one; asking for tuned is an error."""
    cmd = [sys.executable, str(BENCH / "speed.py"), "--steps", "1", "--ipcs", "1", "--device", "cpu"]
    cmd += ["--profile", "smoke", "--matmul-size", "64", "--threads", THREADS, "--out", str(tmp_path)]
    cmd += ["--methods", "RandomSubset"]
    env = {**os.environ, "LIGHTNING_DISTILL_TUNE_MALLOC": "0"}
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "measuring the default allocator" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert rows and all(r["allocator"] == "default" for r in rows)
    p = subprocess.run([*cmd, "--allocator", "tuned"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "needs glibc's mallopt" in p.stderr


def test_cross_arch_table_plot_and_resume(data_root: Path, tmp_path: Path) -> None:
    import cross_arch

    from lightning_distill.cli import main as cli

    run = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "random" / "mnist_ipc1.yaml"
    cli(
        ["fit", "--config", str(recipe), f"--trainer.default_root_dir={run}", f"--data.init_args.root={data_root}"]
        + ["--data.init_args.download=false", "--trainer.logger=false"]
    )
    args = [str(run / "distilled.pt"), "--arch", "lenet", "mlp", "--repeats", "1", "--steps", "5"]
    args += ["--out", str(tmp_path / "out"), "--name", "xa"]
    res = cross_arch.main(args)
    assert [r["arch"] for r in res["rows"]] == ["lenet", "mlp"] and all(r["steps"] == 5 for r in res["rows"])
    md = (tmp_path / "out" / "xa.md").read_text()
    assert "| set | lenet | mlp |" in md and "| RandomSubset (run) |" in md
    assert (tmp_path / "out" / "xa.png").stat().st_size > 0
    assert {"date", "hardware", "torch", "commit"} <= set(
        json.loads((tmp_path / "out" / "xa.json").read_text())["stamp"]
    )
    # Resume: same options, nothing trains again (the saved accuracies come back unchanged).
    again = cross_arch.main(args)
    assert [r["accuracies"] for r in again["rows"]] == [r["accuracies"] for r in res["rows"]]
    assert again["stamp"] == res["stamp"]  # nothing ran, so the table still shows the run that measured it
    # The file re-exported with another set: its saved rows no longer stand, both networks train again.
    payload = load_distilled(run / "distilled.pt")
    payload["images"] = payload["images"].flip(-1).contiguous()
    save_distilled(payload, run / "distilled.pt")
    third = cross_arch.main(args)
    assert [r["arch"] for r in third["rows"]] == ["lenet", "mlp"]
    old_digests = {r["extra"]["set_digest"] for r in res["rows"]}
    assert len(old_digests) == 1 and {r["extra"]["set_digest"] for r in third["rows"]}.isdisjoint(old_digests)
    with pytest.raises(SystemExit):
        cross_arch.main([str(tmp_path / "missing.pt")])


def test_compile_trial_table_agreement_and_no_overwrite(tmp_path: Path) -> None:
    """compile_trial.py times eager against compiled on the pool's pass and checks that they agree (eager backend:
    the plumbing, not inductor's speed); a second run to the same --out keeps the first one's files in replaced/."""
    import compile_trial

    out = tmp_path / "trial"
    argv = ["--widths", "8", "--ipcs", "1", "--real-batch", "16", "--repeats", "1", "--precisions", "fp32"]
    argv += ["--backend", "eager", "--threads", "1", "--out", str(out)]
    res = compile_trial.main(argv)
    (row,) = res["rows"]
    for name in ("real", "support"):
        assert row[name]["eager_ms"] > 0 and row[name]["compiled_ms"] > 0
        assert row[name]["max_rel_diff"] < 1e-5
    assert "| 8 | 1 | 16 | fp32 | support |" in out.with_suffix(".md").read_text()
    first = out.with_suffix(".json").read_text()
    compile_trial.main(argv)
    kept = sorted((tmp_path / "replaced").iterdir())
    assert [p.suffix for p in kept] == [".json", ".md"] and kept[0].read_text() == first


def test_pool_adam_compares_the_two_kernels_and_keeps_the_first_result(tmp_path: Path) -> None:
    """pool_adam.py builds each pooled method twice, on the single-tensor and the fused Adam, and times them
    interleaved; the fused copy really runs the fused kernel (fewer operator calls); a second run keeps the first."""
    import pool_adam

    out = tmp_path / "pool_adam"
    argv = ["--profile", "smoke", "--ipcs", "1", "--steps", "1", "--threads", "1", "--device", "cpu", "--out", str(out)]
    res = pool_adam.main(argv)
    assert [r["method"] for r in res["rows"]] == ["FRePo", "RCIG"]
    for r in res["rows"]:
        assert r["single_ms"] > 0 and r["fused_ms"] > 0 and r["speedup"] > 0
        assert r["fused_calls"] < r["single_calls"]
    assert "| FRePo | 1 | smoke | auto → fp32 | 64 |" in out.with_suffix(".md").read_text()
    first = out.with_suffix(".json").read_text()
    pool_adam.main(argv[:3] + ["1", "--steps", "1", "--methods", "FRePo", "--device", "cpu", "--out", str(out)])
    kept = sorted((tmp_path / "replaced").iterdir())
    assert [p.suffix for p in kept] == [".json", ".md"] and kept[0].read_text() == first


def test_bf16_agreement_compares_the_same_draws_in_both_precisions(tmp_path: Path) -> None:
    """bf16_agreement.py builds each method in float32 and in bf16 from the same state and compares each draw's
    meta-gradients; the draws differ (each its own real batch); a method without a precision argument is refused."""
    import bf16_agreement

    out = tmp_path / "agree"
    argv = ["--profile", "smoke", "--data", "random", "--ipcs", "1", "--draws", "2", "--threads", "1"]
    methods = ["--methods", "FRePo", "MemoriesBPTT", "RCIG"]
    res = bf16_agreement.main([*argv, *methods, "--device", "cpu", "--out", str(out)])
    frepo, memories, rcig = res["rows"]
    assert set(frepo["summary"]) == {"synthetic.images", "synthetic.labels"}
    assert set(memories["summary"]) == {"synthetic.bases", "synthetic.coefficients"}
    # RCIG's outer step is float32 by design (only its pool's training follows the policy): said, not averaged in.
    assert (
        rcig["identical"]
        and "| RCIG | 1 | smoke | 64 | `synthetic.images` | identical:" in out.with_suffix(".md").read_text()
    )
    for row in (frepo, memories):
        assert not row["identical"]
        d0, d1 = row["draws"]
        assert d0["loss_fp32"] != d1["loss_fp32"]  # two real batches, not one step twice
        for s in row["summary"].values():
            # bf16 moves the gradient a little, and does move it (an identical one would mean bf16 never ran).
            assert 0.9 < s["cosine_min"] <= s["cosine_median"] < 1.0 - 1e-6
            assert 0.8 < s["norm_ratio_min"] <= s["norm_ratio_max"] < 1.25
            # The yardstick, another seed in float32 (other networks), moves it much further.
            assert s["seed_cosine_median"] < s["cosine_min"] - 0.1
    assert "| FRePo | 1 | smoke | 64 | `synthetic.images` |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="RandomSubset: precision did not take"):
        bf16_agreement.main([*argv, "--methods", "RandomSubset", "--device", "cpu"])
    with pytest.raises(SystemExit):
        bf16_agreement.main([*argv, "--methods", "NoSuchMethod"])
    # --override sets a method's attribute for every draw (a longer unroll than the profile's), and is recorded.
    one = ["--profile", "smoke", "--data", "random", "--ipcs", "1", "--draws", "1", "--device", "cpu"]
    res = bf16_agreement.main([*one, "--methods", "MemoriesBPTT", "--override", "inner_steps=3", "--out", str(out)])
    assert res["rows"][0]["overrides"] == {"inner_steps": 3}
    assert "| MemoriesBPTT | 1 | smoke, inner_steps=3 | 64 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="FRePo has no attribute 'inner_steps'"):
        bf16_agreement.main([*one, "--methods", "FRePo", "--override", "inner_steps=3"])
    with pytest.raises(SystemExit):
        bf16_agreement.main([*one, "--override", "inner_steps"])


def test_cell_without_random_real(tmp_path: Path) -> None:
    """--random-repeats 0 (random real scored by another cell at the same budget): the cell's page, picture and
    report row stand without it, and the suite counts it as done for a budget of 0 random networks only."""
    import distill_cell

    res = _cell_result(STAMP, random={})
    md = distill_cell.markdown(res)
    assert "| random real (ours) | – | – |" in md and "random real not scored in this cell" in md
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    distill_cell.plot(res, tmp_path / "cell.png")
    assert (tmp_path / "cell.png").stat().st_size > 0 and plt.get_fignums() == before
    rows = suite.cell_rows(res, tmp_path / "frepo_mnist_ipc1_cpu.json")
    assert [r.method for r in rows] == ["FRePo"]
    cell = suite.Cell("recipes/frepo/mnist_ipc1_cpu.yaml", dataclasses.replace(MATRICES["cpu"].cells[0].budget))
    assert any("random-real networks" in p for p in suite._inconsistencies(res, cell))
    cell0 = suite.Cell(cell.recipe, dataclasses.replace(cell.budget, random_repeats=0))
    assert not any("random-real networks" in p for p in suite._inconsistencies(res, cell0))


@pytest.mark.slow  # 32 s on 2 AMD EPYC cores: the default suite stays under its 10 minutes
def test_apm_cell_end_to_end(data_root: Path, tmp_path: Path) -> None:
    """apm_cell.py on the first 600 MNIST images: a one-teacher pool built on first use (then found in the cache),
    two outer steps, every protocol scored, the full-data reference row, the result and its table written."""
    env = _env(mnist_root(data_root, tmp_path / "data", n_train=600, n_test=200), tmp_path / "cache")
    tiny = [
        "--model.init_args.teachers.num_teachers=1",
        "--model.init_args.teachers.epochs=1",
        "--model.init_args.student_epochs=2",
        "--model.init_args.num_checkpoints=2",
    ]
    cmd = [
        sys.executable, str(BENCH / "apm_cell.py"), str(REPO / "recipes/apm/mnist_ipc1_cpu.yaml"), "--max-steps", "2",
        "--repeats", "1", "--eval-steps", "2", "--reference-epochs", "1", "--out", str(tmp_path / "results"),
        "--threads", THREADS, *tiny,
    ]  # fmt: skip
    curve = ["--curve", "1", "--curve-minutes", "0.001"]  # a snapshot after the first step, scored on its own
    p = subprocess.run([*cmd, *curve], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "results" / "apm_mnist_ipc1_cpu.json").read_text())
    assert (r["method"], r["dataset"], r["ipc"], r["steps"]) == ("APM", "mnist", 1, 2)
    assert r["teachers"]["teachers"] == 1 and r["label_storage"]["label_kind"] == "logits"
    for key in ("distilled", "random"):
        assert set(r[key]) == {"apm", "dc", "krr"} and all(v["steps"] == 2 for v in r[key].values())
    assert r["distilled"]["apm"]["extra"]["protocol"]["loss"] == "l1_mean"  # the logits, regressed as APM does
    assert r["reference"]["epochs"] == 1 and 0 <= r["reference"]["test_acc"] <= 100
    assert not list((tmp_path / "results").glob("*.partial.json"))
    md = (tmp_path / "results" / "apm_mnist_ipc1_cpu.md").read_text()
    assert "| APM (ours) |" in md and "full training set" in md and r["stamp"]["commit"] in md
    assert r["curve"] and r["curve"][0]["step"] >= 1 and 0 <= r["curve"][0]["apm_acc"] <= 100
    assert f"(step {r['curve'][0]['step']}): apm" in md
    # A second cell finds the pool in the cache instead of training it again, and keeps the first result.
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    again = json.loads((tmp_path / "results" / "apm_mnist_ipc1_cpu.json").read_text())
    assert again["teachers"]["seconds_this_run"] < 1 and again["teachers"]["folder"] == r["teachers"]["folder"]
    assert list((tmp_path / "results" / "replaced").glob("apm_mnist_ipc1_cpu.*.json"))
    # The results table says each row's apm score first in its notes (neither the krr nor the dc column holds it).
    rows, md = suite.report(tmp_path / "results", tmp_path / "RESULTS.md")
    assert [r.other["protocol"] for r in rows if r.method in ("APM", "random real")] == ["apm", "apm"]
    assert md.count("**apm protocol:") == 2 and "labelled with the distilled set's teacher's logits" in md
    # The full-data reference and the teacher pool are the ceiling, in a table of their own.
    assert "## The full training set: the ceiling" in md and f"**{r['reference']['test_acc']:.2f}**" in md
    assert f"APM's teacher pool: 1 x convnet {{'width': 32}}, mean of the pool | {r['teachers']['test_acc']:.2f}" in md


def test_sweep_options_are_named_runs() -> None:
    import sweep

    runs = sweep.parse_options(["lr --model.init_args.syn_optimizer.init_args.lr=0.01", "w --a.b='{\"w\": 1}'"])
    assert runs == {"base": [], "lr": ["--model.init_args.syn_optimizer.init_args.lr=0.01"], "w": ['--a.b={"w": 1}']}
    for bad, says in (
        (["base --a=1"], "used twice"),
        (["x --a=1", "x --b=2"], "used twice"),
        (["x"], "at least one override"),
        (["x a=1"], "--key=value"),
        (["--a=1"], "start with the run's name"),
    ):
        with pytest.raises(SystemExit, match=says):
            sweep.parse_options(bad)


def test_sweep_merges_the_runs_of_another_process(tmp_path: Path) -> None:
    import sweep

    runs = sweep.parse_options(["a --x=1", "b --x=2", "c --x=3"])
    options = {"minutes": 7.0, "repeats": 2, "runs": runs}
    made = {"base": {"overrides": [], "v": 0}, "b": {"overrides": ["--x=2"], "v": 2}, "d": {"overrides": ["--x=4"]}}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"recipe": "r.yaml", "options": {**options, "runs": {}}, "runs": made, "ipc": 1}))
    taken, measured = sweep.merge_runs([other], "r.yaml", options, have={"base": {"overrides": [], "v": 9}})
    assert taken == {"b": made["b"]} and measured == {"ipc": 1}  # base is had; d was not asked for
    stale = {**made, "a": {"overrides": ["--x=5"]}}  # same name, other overrides: not the asked-for run
    other.write_text(json.dumps({"recipe": "r.yaml", "options": options, "runs": stale}))
    assert "a" not in sweep.merge_runs([other], "r.yaml", options, have={})[0]
    for recipe, opts, says in (("q.yaml", options, "same recipe"), ("r.yaml", {**options, "repeats": 5}, "options")):
        other.write_text(json.dumps({"recipe": recipe, "options": opts, "runs": made}))
        with pytest.raises(SystemExit, match=says):
            sweep.merge_runs([other], "r.yaml", options, have={})
    with pytest.raises(SystemExit, match="cannot read"):
        sweep.merge_runs([tmp_path / "missing.json"], "r.yaml", options, have={})
    # --only names runs that exist (before anything is loaded or distilled).
    p = subprocess.run(
        [sys.executable, str(BENCH / "sweep.py"), "r.yaml", "--minutes", "1", "--option", "a --x=1", "--only", "b"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode != 0 and "--only b: no such run; the runs are base, a" in p.stderr


@pytest.mark.slow  # 49 s on 2 AMD EPYC cores: the default suite stays under its 10 minutes
def test_sweep_end_to_end_scores_on_validation_and_resumes(data_root: Path, tmp_path: Path) -> None:
    """sweep.py on the first 600 MNIST images: the recipe and one variant, two steps each, scored on the held-out
    validation split; a sweep that died after its first run picks up at the second."""
    env = _env(mnist_root(data_root, tmp_path / "data", n_train=600, n_test=100), tmp_path / "cache")
    cmd = [
        sys.executable, str(BENCH / "sweep.py"), str(REPO / "recipes/frepo/mnist_ipc1_cpu_bf16.yaml"), "--minutes", "1",
        "--max-steps", "2", "--repeats", "1", "--eval-steps", "2", "--out", str(tmp_path / "results"),
        "--threads", THREADS, "--option", "small --data.init_args.batch_size=64 --model.init_args.online_batch=64",
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "results" / "sweep_frepo_mnist_ipc1_cpu_bf16.json"
    r = json.loads(out.read_text())
    assert list(r["runs"]) == ["base", "small"] and r["best"] in r["runs"]
    assert r["split"] == "val" and r["val_images"] == 60  # val_size 0.1 of the 600 training images
    for run in r["runs"].values():
        assert run["steps"] == 2 and run["val"]["steps"] == 2 and run["val"]["num_images"] == 10
    assert r["runs"]["small"]["overrides"] == ["--data.init_args.batch_size=64", "--model.init_args.online_batch=64"]
    md = out.with_suffix(".md").read_text()
    assert "validation images held out" in md and f"Best on validation: **{r['best']}**" in md
    assert out.with_suffix(".png").stat().st_size > 0
    # Died after its first run: the partial keeps it, and only the second run is made again.
    died = {**r, "runs": {"base": r["runs"]["base"]}}
    del died["best"]
    out.with_name(out.stem + ".partial.json").write_text(json.dumps(died))
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "resuming" in p.stdout and "== base" not in p.stdout, p.stdout[-3000:]
    again = json.loads(out.read_text())
    assert again["runs"]["base"] == r["runs"]["base"] and list(again["runs"]) == ["base", "small"]
    assert list((tmp_path / "results" / "replaced").glob("sweep_frepo_mnist_ipc1_cpu_bf16.*.json"))
    # Extended with one more run: only that one is made; the finished runs are reused.
    p = subprocess.run([*cmd, "--option", "lr --model.init_args.syn_optimizer.init_args.lr=0.01"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0 and "== lr" in p.stdout and "== small" not in p.stdout, p.stdout[-3000:]
    more = json.loads(out.read_text())
    assert list(more["runs"]) == ["base", "small", "lr"] and more["runs"]["small"] == again["runs"]["small"]
    # The results report shows the sweep in a section of its own (not as a file it did not understand).
    _, report = suite.report(tmp_path / "results", tmp_path / "RESULTS.md")
    assert "## How a cell's budget is spent: sweeps" in report and f"Best on validation: **{more['best']}**" in report
    assert "![sweep_frepo_mnist_ipc1_cpu_bf16]" in report and "not understood" not in report


def test_snapshots_stop_at_the_curve_length(tmp_path: Path) -> None:
    """--curve N takes N snapshots: a run still going at N+1 intervals (stopped by the wall clock, not its horizon)
    adds none for the final set, which the cell scores anyway."""
    import distill_cell

    snaps = distill_cell.Snapshots(tmp_path, every_min=1.0, count=2)
    saved = []
    snaps.save = lambda trainer, module, elapsed: saved.append(elapsed) or snaps.taken.append(elapsed)
    snaps.on_train_start(None, None)
    for minutes in (0.5, 1.0, 2.0, 3.0, 4.0):
        snaps.start = time.perf_counter() - 60 * minutes - 1
        snaps.on_train_batch_end(None, None)
    assert len(saved) == 2


def test_krr_width_pairs_a_cell_with_the_evaluation_of_its_own_export(tmp_path: Path) -> None:
    cell = suite.cell_rows(_cell_result(STAMP), tmp_path / "frepo_mnist_ipc1_cpu.json")  # krr at width 64, step 2400

    def evaluated(step: int, kwargs: dict, acc: float) -> list:
        extra = {"arch_kwargs": kwargs, "dataset": "mnist", "ipc": 1, "method": "FRePo", "step": step}
        extra["path"] = "runs/bench/frepo_mnist_ipc1_cpu/distilled.pt"
        res = EvalResult("krr", "convnet_frepo", [acc] * 5, 10, 1000, 1.0, extra).to_dict()
        return suite.eval_rows({"stamp": STAMP, "results": [res]}, tmp_path / f"e{step}{len(kwargs)}.json")

    paper_net = {"norm": "none"}
    rows = [*cell, *evaluated(2400, paper_net, 92.0), *evaluated(1200, paper_net, 50.0)]
    rows += evaluated(2400, {"norm": "none", "width": 32}, 40.0)  # another narrow network: not the paper's
    (line,) = suite.krr_width_rows(rows, "results")
    assert "| 2400 | 90.0 ± 0.0 (width 64) | 92.0 ± 0.0 | 5 | 93.0 ± 0.4 | [e24001.json](results/e24001.json) |" in line
    assert suite.krr_width_rows(cell, "results") == []  # nothing to pair


def test_commit_stamp_of_a_copied_tree_names_the_commit_it_was_given(tmp_path, monkeypatch):
    # A GPU machine gets a copy of the working tree without .git: its stamps say which commit it was, or unknown.
    from lightning_distill import provenance

    monkeypatch.setattr(provenance, "REPO", tmp_path)
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert provenance.commit() == "unknown"
    monkeypatch.setenv(provenance.COMMIT_ENV, "abc1234")
    assert provenance.commit() == "abc1234 (copy)"
    monkeypatch.setattr(provenance, "REPO", Path(__file__).resolve().parents[1])
    assert provenance.commit() == "abc1234 (copy)"  # a copy may hold a stale .git: the name given wins
    monkeypatch.delenv(provenance.COMMIT_ENV)
    assert provenance.commit() not in ("abc1234 (copy)", "unknown")  # a checkout: git answers


def test_speed_keeps_finished_rows_when_stopped_part_way(tmp_path: Path, monkeypatch) -> None:
    """A run cut off (a GPU lease's time limit) leaves every finished configuration in NAME.partial.json."""
    import speed

    real, calls = speed.measure_variants, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal does mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "measure_variants", stop_at_the_second)
    argv = ["--steps", "1", "--ipcs", "1", "2", "--device", "cpu", "--profile", "smoke", "--matmul-size", "64"]
    argv += ["--threads", THREADS, "--out", str(tmp_path), "--name", "cut", "--methods", "RandomSubset"]
    argv += ["--inputs", "28px grey"]
    with pytest.raises(KeyboardInterrupt):
        speed.main(argv)
    kept = json.loads((tmp_path / "cut.partial.json").read_text())
    assert [(r["method"], r["ipc"]) for r in kept["rows"]] == [("RandomSubset", 1)] and "stamp" in kept
    assert not (tmp_path / "cut.json").exists()
    monkeypatch.setattr(speed, "measure_variants", real)
    speed.main(argv)
    assert (tmp_path / "cut.json").exists() and not (tmp_path / "cut.partial.json").exists()


def test_speed_counts_flops_on_an_apm_image_update_not_a_retrain() -> None:
    """The FLOP-counted step is the kind the median is: an image update, never a student retrain."""
    import speed

    cfg = speed.Configuration("APM", (1, 28, 28), 1, "cpu", "smoke", "fp32")
    for _ in range(3):  # calls 0 (a retrain), 1, 2: the next call, 3, would retrain
        cfg.step()
    students = cfg.method.students
    speed.BEFORE_FLOP_STEP["APM"](cfg.method)
    assert cfg.flops() > 0 and cfg.method.students is students  # no new student was trained
    cfg.step()  # call 5: an image update
    assert cfg.method.students is students
    cfg.step()  # call 6: the cadence goes on
    assert cfg.method.students is not students


def test_init_coverage_scores_both_starting_sets_and_draws_them(tmp_path: Path, data_root: Path) -> None:
    """init_coverage.py scores random and k-means starting images by the nearest-image proxy on validation; on MNIST
    (fixture or full data) the k-means picks cover the classes better, which is the reason for ``init: kmeans``."""
    import init_coverage

    out = tmp_path / "cov"
    argv = ["--dataset", "mnist", "--root", str(data_root), "--ipcs", "1", "5", "--seeds", "0", "1", "--out", str(out)]
    res = init_coverage.main(argv)
    by = {(r["ipc"], r["init"]): r for r in res["rows"]}
    assert set(by) == {(i, k) for i in (1, 5) for k in ("real", "kmeans")}
    assert all(len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 100 for r in res["rows"])
    assert by[(5, "kmeans")]["mean"] > by[(5, "real")]["mean"]
    assert "| 5 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_sweep_reports_the_spread_of_runs_that_differ_only_in_the_seed() -> None:
    """Runs whose overrides match once the seed is taken out (no seed override means seed 0) are grouped, and the
    Markdown states their range, so a one-seed difference smaller than it is not read as a ranking."""
    import sweep

    def run(overrides: list[str], mean: float) -> dict[str, object]:
        return {"overrides": overrides, "val": {"mean": mean}}

    runs = {
        "base": run([], 96.9),
        "a": run(["--x=1"], 97.0),
        "a_seed1": run(["--model.init_args.seed=1", "--x=1"], 97.5),
        "a_seed2": run(["--x=1", "--model.init_args.seed=2"], 97.1),
        "b_seed1": run(["--y=2", "--model.init_args.seed=1"], 97.4),
    }
    assert sweep.seed_groups(runs) == [["a", "a_seed1", "a_seed2"]]
    (line, blank) = sweep.seed_lines(runs)
    assert line.startswith("Seed spread: a, a_seed1, a_seed2") and "97.0-97.5 (0.5 points)" in line and blank == ""
    assert sweep.seed_lines({"base": runs["base"], "a": runs["a"]}) == []


def test_sweep_names_the_best_configuration_by_its_mean_over_seeds() -> None:
    """A configuration's lucky seed does not make it the best: the sweep ranks configurations by the mean over their
    seeds, names the first run of the winner, and says how many seeds the mean is over."""
    import sweep

    def run(overrides: list[str], mean: float) -> dict[str, object]:
        return {"overrides": overrides, "val": {"mean": mean}}

    runs = {
        "base": run([], 97.2),
        "a": run(["--x=1"], 96.9),
        "a_seed1": run(["--x=1", "--model.init_args.seed=1"], 97.5),  # the best single run, of a worse configuration
    }
    assert sweep.configurations(runs) == [["base"], ["a", "a_seed1"]]
    assert sweep.best_configuration(runs) == ["base"]
    assert sweep.best_line({"runs": runs, "best": "base"}) == "Best on validation: **base**."
    runs["a_seed1"]["val"]["mean"] = 97.7  # now a's mean, 97.3, beats base
    assert sweep.best_configuration(runs) == ["a", "a_seed1"]
    assert sweep.best_line({"runs": runs, "best": "a"}) == (
        "Best on validation: **a** (97.3, the mean of its 2 seeds: a, a_seed1)."
    )


def test_a_score_of_one_network_shows_no_spread() -> None:
    """``mean ± std`` over two or more networks; one network's score alone, since its std of 0 measures nothing."""
    import stamp

    assert stamp.pm(None) == "–"
    assert stamp.pm({"mean": 97.64, "std": 0.0, "accuracies": [97.64]}) == "97.6"
    assert stamp.pm({"mean": 97.775, "std": 0.055, "accuracies": [97.83, 97.72]}) == "97.8 ± 0.1"
