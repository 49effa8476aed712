"""Run folders: checkpoints at a stable place, ``fit --resume`` continues exactly, refusals that keep work safe.

The end-to-end test kills ``lightning-distill fit`` with SIGKILL mid-run, resumes it with the documented command and
compares the final export with an uninterrupted run's, bit for bit. It runs for every method in ``KILL_RESUME``:
a new method joins with one line (its recipe and the options that make it tiny).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.export import load_distilled
from lightning_distill.io import orphaned_temporaries, temporary_destination
from lightning_distill.resume import (
    RUN_FILE,
    RunFolderError,
    StepProgressBar,
    find_resume_checkpoint,
    identity_differences,
    recipe_identity,
)

REPO = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("lightning-distill")

#: method -> (its recipe, the options that make it tiny). The test distils STEPS steps, kills after KILL_AFTER.
KILL_RESUME: dict[str, tuple[str, list[str]]] = {
    "random": ("recipes/random/mnist_ipc1.yaml", []),
    "frepo": (
        "recipes/frepo/mnist_ipc1_cpu_lr3e-3.yaml",
        [
            '--model.init_args.arch_kwargs={"width": 8}',
            "--model.init_args.pool_size=3",
            "--model.init_args.members_per_step=2",  # the members drawn for the next step travel in the checkpoint
            "--model.init_args.online_batch=64",
        ],
    ),
    "rcig": (
        "recipes/rcig/mnist_ipc1_cpu.yaml",
        [
            '--model.init_args.arch_kwargs={"width": 8, "depth": 2}',
            "--model.init_args.pool_size=2",
            "--model.init_args.inner_steps=3",
            "--model.init_args.hinv_steps=3",
            "--data.init_args.batch_size=64",
        ],
    ),
}
STEPS, KILL_AFTER = 6, 3

EXPORT = {"class_path": "lightning_distill.callbacks.ExportDistilled"}
EVERY_STEP = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"every_n_train_steps": 1, "save_last": True},
}


class StallAfter(L.Callback):
    """Holds a run still once step ``step`` is checkpointed, so that the test's SIGKILL lands mid-run, not after it.

    It waits at the start of the next step (ModelCheckpoint saved step ``step``, and ``last.ckpt``, at the end of the
    one before) and says so by creating ``marker``: killed then, the run's last checkpoint is step ``step`` exactly.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            Path(self.marker).touch()
            time.sleep(3600)


def _command(method: str, root: Path, data_root: Path, callbacks: list[dict], *extra: str) -> list[str]:
    recipe, tiny = KILL_RESUME[method]
    return [
        str(EXE),
        "fit",
        "--config",
        str(REPO / recipe),
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.root={data_root}",
        "--data.init_args.download=false",
        "--data.init_args.batch_size=64",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=true",
        f"--trainer.max_steps={STEPS}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *tiny,
        *extra,
    ]


def _env() -> dict[str, str]:
    # One thread in every process (the same arithmetic in all three), and the repository importable for StallAfter.
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env["LIGHTNING_DISTILL_TEST_THREADS"] = "1"
    return env


def _finish(p: subprocess.Popen, what: str, timeout: float = 600) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{what} exited {p.returncode}:\n{out[-3000:]}"
    return out


@pytest.mark.parametrize("method", list(KILL_RESUME))
def test_kill_and_resume_gives_the_uninterrupted_set(method, data_root, tmp_path):
    straight_root, killed_root = tmp_path / "straight", tmp_path / "killed"
    opts = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "env": _env(), "cwd": tmp_path}
    # The uninterrupted run goes alongside the one that is killed (both one thread): the test waits once, not twice.
    straight = subprocess.Popen(_command(method, straight_root, data_root, [EXPORT, EVERY_STEP]), **opts)
    marker = tmp_path / "stalled"
    stall = {"class_path": "tests.test_resume.StallAfter", "init_args": {"step": KILL_AFTER, "marker": str(marker)}}
    killed = subprocess.Popen(_command(method, killed_root, data_root, [EXPORT, EVERY_STEP, stall]), **opts)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert killed.poll() is None, f"the run ended before step {KILL_AFTER}:\n{killed.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint of the step to kill after"
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_root / "distilled.pt").exists()  # killed mid-run: the final export was never written
    assert list((killed_root / "checkpoints").glob(f"*step={KILL_AFTER}.ckpt"))

    # The documented command: the same recipe and options, plus --resume.
    out = _finish(
        subprocess.Popen(_command(method, killed_root, data_root, [EXPORT, EVERY_STEP], "--resume"), **opts), "resume"
    )
    # It continued from the kill (a run started over with the same seed would end with the same set, too).
    assert f"resuming from {killed_root / 'checkpoints' / 'last.ckpt'} at step {KILL_AFTER}" in out
    assert "Restored all states from the checkpoint" in out
    _finish(straight, "the uninterrupted run")

    a, b = load_distilled(straight_root / "distilled.pt"), load_distilled(killed_root / "distilled.pt")
    assert a["step"] == b["step"] == STEPS
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    starts = json.loads((killed_root / RUN_FILE).read_text())["starts"]
    assert [s["mode"] for s in starts] == ["new", "resume"] and starts[1]["step"] == KILL_AFTER


# ------------------------------------------------------------------------------------------- in-process checks
def _fit(data_root: Path, root: Path, *extra: str, steps: int = 2, callbacks: list[dict] | None = None):
    """``lightning-distill fit`` on the random baseline, in this process (seconds), checkpointing every step."""
    return main(
        [
            "fit",
            "--config",
            str(REPO / "recipes/random/mnist_ipc1.yaml"),
            f"--trainer.default_root_dir={root}",
            f"--data.init_args.root={data_root}",
            "--data.init_args.download=false",
            "--trainer.enable_checkpointing=true",
            "--trainer.enable_model_summary=false",
            f"--trainer.max_steps={steps}",
            f"--trainer.callbacks={json.dumps(callbacks or [EXPORT, EVERY_STEP])}",
            *extra,
        ]
    )


def _refused(capsys, *args, **kwargs) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _fit(*args, **kwargs)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("lightning-distill fit: error: ") and "\n" not in err, err
    return err


def test_resume_with_nothing_to_resume_from_stops(data_root, tmp_path, capsys):
    root = tmp_path / "run"
    for how in (["--resume"], ["--ckpt_path", "last"]):
        err = _refused(capsys, data_root, root, "--trainer.logger=false", *how)
        assert "nothing to resume from: no checkpoint in" in err and "without --resume to start a new run" in err
    assert not root.exists()  # nothing written
    err = _refused(capsys, data_root, root, "--trainer.logger=false", "--resume", "--fresh")
    assert "give one of them" in err


def test_a_budget_of_no_step_or_no_end_is_refused(data_root, tmp_path, capsys):
    root = tmp_path / "run"
    err = _refused(capsys, data_root, root, "--trainer.logger=false", steps=0)
    assert "--trainer.max_steps 0 trains nothing" in err
    err = _refused(capsys, data_root, root, "--trainer.logger=false", steps=-1)
    assert "never ends" in err
    _fit(data_root, root, "--trainer.logger=false", "--trainer.max_time=00:00:00:02", steps=-1, callbacks=[EXPORT])
    assert (root / "distilled.pt").is_file()


def test_a_new_run_over_another_is_refused_and_fresh_moves_it_aside(data_root, tmp_path, capsys):
    root = tmp_path / "run"
    _fit(data_root, root, "--trainer.logger=false")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    err = _refused(capsys, data_root, root, "--trainer.logger=false")
    assert "holds another run (distilled.png, distilled.pt, checkpoints/" in err
    assert "continue it with --resume, or start over with --fresh" in err
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # untouched
    old = load_distilled(root / "distilled.pt")

    _fit(data_root, root, "--trainer.logger=false", "--fresh", "--model.init_args.seed=1")
    (previous,) = (root / "previous").iterdir()
    assert torch.equal(load_distilled(previous / "distilled.pt")["images"], old["images"])
    assert (previous / "checkpoints" / "last.ckpt").is_file() and (previous / RUN_FILE).is_file()
    assert not torch.equal(load_distilled(root / "distilled.pt")["images"], old["images"])  # the new run's set
    assert [s["mode"] for s in json.loads((root / RUN_FILE).read_text())["starts"]] == ["fresh"]


def test_a_resume_with_another_recipe_is_refused(data_root, tmp_path, capsys):
    root = tmp_path / "run"
    _fit(data_root, root, "--trainer.logger=false")
    err = _refused(
        capsys, data_root, root, "--trainer.logger=false", "--resume", "--model.init_args.synthetic.init_args.ipc=2"
    )
    assert "refusing to resume" in err and "ipc 1 -> 2" in err
    err = _refused(
        capsys,
        data_root,
        root,
        "--trainer.logger=false",
        "--resume",
        "--data.class_path=lightning_distill.data.FashionMNISTDataModule",
    )
    assert "data MNISTDataModule -> FashionMNISTDataModule" in err
    # What a resume may change: the step budget, the data root, the batch size.
    cli = _fit(data_root, root, "--trainer.logger=false", "--resume", "--data.init_args.batch_size=32", steps=3)
    assert cli.trainer.global_step == 3


def test_resume_keeps_the_wandb_run_and_checkpoints_stay_in_the_run_folder(data_root, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "run"
    wandb_dir = f"--trainer.logger.init_args.save_dir={root}"
    first = _fit(data_root, root, wandb_dir)
    run_id = first.trainer.logger.experiment.id
    wandb.finish()
    assert json.loads((root / RUN_FILE).read_text())["wandb_run_id"] == run_id
    assert (root / "checkpoints" / "last.ckpt").is_file()  # not under the W&B id, where the next run never looks
    resumed = _fit(data_root, root, wandb_dir, "--resume", steps=3)
    assert resumed.trainer.logger.experiment.id == run_id and resumed.trainer.global_step == 3
    wandb.finish()
    # offline-run-<date_time>-<id>, and W&B adds "-1" to the second folder when both runs start in the same second.
    assert sorted(p.name.split("-")[3] for p in (root / "wandb").glob("offline-run-*")) == [run_id, run_id]
    # The id stays out of config.yaml: a new run started from that file gets a W&B run of its own.
    assert run_id not in (root / "config.yaml").read_text()


def test_the_progress_bar_counts_steps_from_where_the_run_resumed(data_root, tmp_path):
    root = tmp_path / "run"
    _fit(data_root, root, "--trainer.logger=false")
    cli = _fit(data_root, root, "--trainer.logger=false", "--resume", steps=4)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    tqdm = bar.train_progress_bar
    assert (tqdm.initial, tqdm.n, tqdm.total) == (2, 4, 4)  # 2/4 at the start, 4/4 at the end: the whole budget


def test_a_finished_run_resumed_rewrites_its_export(data_root, tmp_path, capsys):
    root = tmp_path / "run"
    _fit(data_root, root, "--trainer.logger=false")
    first = load_distilled(root / "distilled.pt")
    (root / "distilled.pt").unlink()  # as if killed between the final checkpoint and the export
    _fit(data_root, root, "--trainer.logger=false", "--resume")
    again = load_distilled(root / "distilled.pt")
    assert again["step"] == 2 and torch.equal(again["images"], first["images"])


def test_orphaned_temporary_files_are_removed_on_the_next_run(data_root, tmp_path):
    root = tmp_path / "run"
    _fit(data_root, root, "--trainer.logger=false")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the writer a SIGKILL ended
    orphans = [root / f".distilled.pt.{gone.pid}.abc_1234.tmp", root / "checkpoints" / f".last.ckpt.{gone.pid}.zz9.tmp"]
    live = root / f".distilled.png.{os.getpid()}.k3y.tmp"  # a writer still running (this process) keeps its file
    for p in [*orphans, live]:
        p.write_bytes(b"partial")
    assert temporary_destination(orphans[1]) == ("last.ckpt", gone.pid)
    assert orphaned_temporaries(root) == [orphans[0]]
    _fit(data_root, root, "--trainer.logger=false", "--resume", steps=3)
    assert not any(p.exists() for p in orphans) and live.exists()


def test_an_unreadable_last_checkpoint_is_passed_over(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    torch.save({"global_step": 4, "state_dict": {}}, d / "epoch=0-step=4.ckpt")
    (d / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    info, bad = find_resume_checkpoint([d])
    assert info is not None and info.step == 4 and bad == [d / "last.ckpt"]
    torch.save({"global_step": 5}, d / "last-v1.ckpt")
    info, _ = find_resume_checkpoint([d])
    assert info.step == 5 and info.path.name == "last-v1.ckpt"


def test_identity_leaves_out_what_a_resume_may_change():
    config = {
        "model": {
            "class_path": "lightning_distill.methods.FRePo",
            "init_args": {"lr": 1, "synthetic": {"class_path": "P", "init_args": {"ipc": 1, "init": "real"}}},
        },
        "data": {"class_path": "D", "init_args": {"root": "/a", "batch_size": 256, "zca": "none"}},
    }
    moved = json.loads(json.dumps(config))
    moved["data"]["init_args"].update(root="/b", batch_size=64)
    moved["model"]["init_args"].update(lr=2)
    moved["model"]["init_args"]["synthetic"]["init_args"]["init"] = "noise"
    assert recipe_identity(config) == recipe_identity(moved)
    moved["data"]["init_args"]["zca"] = "trace"
    assert identity_differences(recipe_identity(config), recipe_identity(moved)) == ["data zca none -> trace"]
    with pytest.raises(RunFolderError, match="max_steps 0"):
        from lightning_distill.resume import check_budget

        check_budget(0, None, None)


def test_export_removes_orphans_of_its_files_in_a_plain_trainer(data_root, tmp_path):
    from lightning_distill.callbacks import ExportDistilled
    from lightning_distill.methods import RandomSubset
    from lightning_distill.synthetic import PixelSet
    from tests.helpers import quiet_trainer, tiny_mnist_dm

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tmp_path.mkdir(exist_ok=True)
    orphan = tmp_path / f".distilled.pt.{gone.pid}.q1w2e3r4.tmp"
    other = tmp_path / f".results.json.{gone.pid}.q1w2e3r4.tmp"  # not the export's: left to its owner
    for p in (orphan, other):
        p.write_bytes(b"partial")
    trainer = quiet_trainer(tmp_path, 1, [ExportDistilled()])
    trainer.fit(RandomSubset(synthetic=PixelSet(ipc=1)), datamodule=tiny_mnist_dm(data_root))
    assert not orphan.exists() and other.exists() and (tmp_path / "distilled.pt").is_file()


def test_a_run_stopped_by_its_max_time_is_not_resumed_silently(tmp_path):
    from lightning_distill.resume import CheckpointInfo, RunPlan

    plan = RunPlan(root=tmp_path, identity={})
    info = CheckpointInfo(path=tmp_path / "last.ckpt", step=900, train_seconds=1800.5)
    with pytest.raises(
        RunFolderError, match=r"stopped at its --trainer.max_time \(00:00:30:00.*raise --trainer.max_time"
    ):
        plan._check_time(info, "00:00:30:00")
    plan._check_time(info, "00:01:00:00")  # a raised limit continues it
