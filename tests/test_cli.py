"""End to end: `lightning-distill fit` with a recipe, the export, then `lightning-distill evaluate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger

import lightning_distill.cli as cli
import lightning_distill.eval
from lightning_distill.callbacks import ExportDistilled
from lightning_distill.cli import cli_main, main
from lightning_distill.eval import PROTOCOLS, EvalResult, Protocol
from lightning_distill.export import load_distilled, set_digest

REPO = Path(__file__).resolve().parents[1]


def _fit_args(recipe, data_root, out, *extra):
    return [
        "fit",
        "--config",
        str(REPO / recipe),
        f"--trainer.default_root_dir={out}",
        f"--data.init_args.root={data_root}",
        "--data.init_args.download=false",
        *extra,
    ]


def test_fit_export_evaluate(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    main(_fit_args("recipes/random/mnist_ipc1.yaml", data_root, out, "--trainer.logger=false"))
    payload = load_distilled(out / "distilled.pt")
    assert payload["images"].shape == (10, 1, 28, 28) and payload["method"] == "RandomSubset"
    assert (out / "distilled.png").is_file() and (out / "config.yaml").is_file()
    capsys.readouterr()
    main(
        [
            "evaluate",
            str(out / "distilled.pt"),
            "--protocol",
            "dc",
            "--arch",
            "lenet,mlp",
            "--repeats",
            "2",
            "--steps",
            "30",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "| mnist | 1 | RandomSubset | lenet | dc |" in printed and "| mlp |" in printed
    written = json.loads((out / "distilled_eval_dc_lenet-mlp_r2_s30.json").read_text())  # named after the options
    assert {"date", "hardware", "torch", "commit"} <= set(written["stamp"])
    res = written["results"]
    assert [r["arch"] for r in res] == ["lenet", "mlp"] and all(len(r["accuracies"]) == 2 for r in res)
    assert all(0 <= a <= 100 for r in res for a in r["accuracies"])

    # --arch-kwargs reaches the network (and is recorded): a width-8 krr network instead of the protocol's 128.
    args = ["evaluate", str(out / "distilled.pt"), "--protocol", "krr", "--repeats", "1", "--steps", "2"]
    main([*args, "--arch-kwargs", '{"width": 8}', "--no-progress", "--output", str(tmp_path / "w8.json")])
    (r,) = json.loads((tmp_path / "w8.json").read_text())["results"]
    assert r["arch"] == "convnet_frepo" and r["extra"]["arch_kwargs"] == {"norm": "none", "width": 8}
    # Which set was scored, not only which path: a repeated run replaces the file under the same name.
    assert r["extra"]["set_digest"] == set_digest(load_distilled(out / "distilled.pt"))
    # ...and the precision it was distilled under (the method's resolved policy, from the export).
    assert r["extra"]["distilled_precision"] == load_distilled(out / "distilled.pt")["config"]["precision_resolved"]
    for bad in ("{width: 8}", "[8]"):
        with pytest.raises(SystemExit):
            main([*args, "--arch-kwargs", bad])
        assert "--arch-kwargs must be a JSON object" in capsys.readouterr().err

    # --precision reaches the networks and is recorded (bf16 forced: it runs on any CPU, only slower without AMX).
    bf16 = ["--arch-kwargs", '{"width": 8}', "--precision", "bf16", "--no-progress", "--output", str(tmp_path / "b")]
    main([*args, *bf16])
    (r,) = json.loads((tmp_path / "b").read_text())["results"]
    assert r["extra"]["precision"]["resolved"] == "bf16"
    with pytest.raises(SystemExit):
        main([*args, "--precision", "fp16"])
    assert "--precision" in capsys.readouterr().err


def test_wandb_offline_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    hparams: list[dict[str, Any]] = []
    artifacts: list[str] = []
    real_log_hyperparams = WandbLogger.log_hyperparams
    real_log_artifact = ExportDistilled.log_artifact

    def spy_log_artifact(self, logger, path):
        artifacts.append(real_log_artifact(self, logger, path).name)

    def spy_log_hyperparams(self, params, *args, **kwargs):
        hparams.append(dict(params))
        return real_log_hyperparams(self, params, *args, **kwargs)

    monkeypatch.setattr(WandbLogger, "log_hyperparams", spy_log_hyperparams)
    monkeypatch.setattr(ExportDistilled, "log_artifact", spy_log_artifact)
    out = tmp_path / "run"
    cli_obj = main(
        _fit_args("recipes/random/mnist_ipc1.yaml", data_root, out, f"--trainer.logger.init_args.save_dir={out}")
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert load_distilled(out / "distilled.pt")["ipc"] == 1
    # The resolved config reached W&B: what the method's own hyperparameters leave out (the synthetic set) is there.
    config = next(h for h in hparams if "model/synthetic/ipc" in h)
    assert config["model/synthetic/ipc"] == 1 and config["model/synthetic/labels"] == "hard"
    assert config["model/class_path"] == "lightning_distill.methods.RandomSubset"
    run_config = cli_obj.trainer.logger.experiment.config
    assert run_config["model/synthetic/ipc"] == 1 and run_config["trainer/max_steps"] == 1
    assert artifacts == ["distilled-mnist-ipc1"]  # ExportDistilled logs the set (the recipe has no image logger)


def test_config_reaches_every_logger(data_root, tmp_path):
    out = tmp_path / "run"
    args = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={out}"]
    cli_main(_fit_args("recipes/random/mnist_ipc1.yaml", data_root, out, *args))
    (hparams_file,) = out.glob("*/version_*/hparams.yaml")
    hp = yaml.safe_load(hparams_file.read_text())
    assert hp["model/synthetic/ipc"] == 1 and hp["model/synthetic/labels"] == "hard" and hp["data/batch_size"] == 256
    assert hp["trainer/callbacks/0/class_path"] == "lightning_distill.callbacks.ExportDistilled"
    assert all(v is None or isinstance(v, (bool, int, float, str, list, dict)) for v in hp.values())
    # config.yaml is written as before, in the logger's folder (LightningCLI's log_dir).
    saved = yaml.safe_load(next(out.glob("*/version_*/config.yaml")).read_text())
    assert saved["model"]["init_args"]["synthetic"]["init_args"]["ipc"] == 1


def test_given_arguments_raise_no_warning_about_the_process_own(data_root, tmp_path, monkeypatch, recwarn):
    """A benchmark calls cli_main with the whole command while its own argv holds other options: no warning then."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/sweep.py", "recipe.yaml", "--minutes", "7"])
    out = tmp_path / "run"
    args = _fit_args("recipes/random/mnist_ipc1.yaml", data_root, out, "--trainer.logger=false")[1:]
    cli_main(args, run=False)
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_flatten_config():
    flat = cli.flatten_config(
        {
            "model": {"class_path": "M", "init_args": {"lr": 0.1, "synthetic": {"init_args": {"ipc": 10}}}},
            "trainer": {"callbacks": [{"class_path": "C", "init_args": {"n": 1}}], "devices": [0, 1], "plugins": {}},
            "config": [Path("a.yaml")],
        }
    )
    assert flat == {
        "model/class_path": "M",
        "model/lr": 0.1,
        "model/synthetic/ipc": 10,
        "trainer/callbacks/0/class_path": "C",
        "trainer/callbacks/0/n": 1,
        "trainer/devices": [0, 1],
        "trainer/plugins": {},
        "config": ["a.yaml"],
    }


def test_evaluate_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "missing.pt")])
    assert "no distilled set" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit):
        main(["evaluate", str(bad)])
    assert "corrupt or truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(bad), "--protocol", "nope"])
    assert "unknown evaluation protocol" in capsys.readouterr().err


def test_fit_with_ipc_zero_fails_clearly(data_root, tmp_path):
    with pytest.raises((ValueError, SystemExit)) as e:
        main(
            _fit_args(
                "recipes/random/mnist_ipc1.yaml",
                data_root,
                tmp_path,
                "--trainer.logger=false",
                "--model.init_args.synthetic.init_args.ipc=0",
            )
        )
    assert "ipc must be a positive integer" in str(e.value) or e.value.code != 0


def _fake_evaluate(
    path: str,
    protocol: str | Protocol = "dc",
    arch: str | None = None,
    repeats: int = 5,
    data_path: str | None = None,
    progress: bool = True,
    arch_kwargs: dict[str, Any] | None = None,
    new_option: int = 3,
) -> EvalResult:
    """Stands in for evaluate_distilled with one parameter more.

    Args:
        new_option: a brand-new knob of the evaluation.
    """
    name = protocol if isinstance(protocol, str) else protocol.name
    r = EvalResult(name, arch or "convnet", [50.0, 60.0], 10, 1, 0.0)
    r.extra.update(path=path, dataset="mnist", ipc=1, method="Fake", repeats=repeats, data_path=data_path)
    r.extra.update(progress=progress, arch_kwargs=arch_kwargs, new_option=new_option)
    r.extra["protocol_lr"] = None if isinstance(protocol, str) else protocol.lr
    return r


def test_evaluate_options_come_from_the_signature(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lightning_distill.eval, "evaluate_distilled", _fake_evaluate)
    monkeypatch.setitem(PROTOCOLS, "mine", Protocol(name="mine", arch="lenet"))  # registered by other code
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "--new_option" in printed and "brand-new knob" in printed and "mine" in printed
    assert "--repeats" in printed and "--epochs" not in printed  # the options follow the signature
    out = tmp_path / "e.json"
    res = main(
        ["evaluate", "--distilled", "s.pt", "--arch", "vgg11,mlp", "--arch", "convnet", "--new-option=7"]
        + ["--data-path", "d", "--arch-kwargs", '{"width": 8}', "--protocol", "mine", "--no-progress"]
        + ["--output", str(out)]
    )
    assert [r["arch"] for r in res] == ["vgg11", "mlp", "convnet"]  # all three take the width option
    extra = res[0]["extra"]
    assert extra["new_option"] == 7 and extra["data_path"] == "d" and extra["progress"] is False
    assert extra["arch_kwargs"] == {"width": 8} and extra["path"] == "s.pt" and res[0]["protocol"] == "mine"
    assert json.loads(out.read_text())["results"] == res
    # Underscore spellings work too, and a protocol can be given whole; the JSON is named after it.
    (r,) = main(["evaluate", str(tmp_path / "s.pt"), "--data_path", "d", "--protocol", '{"name": "x", "arch": "mlp"}'])
    assert r["protocol"] == "x" and r["extra"]["protocol_lr"] == 0.01 and r["extra"]["progress"] is True
    assert len(list(tmp_path.glob("s_eval_x_mlp_r5_*.json"))) == 1
    for bad, message in [
        (["--new_option", "seven"], "--new_option: expected int"),
        (["--protocol", '{"arch": "mlp"}'], "--protocol: "),
        (["--arch", "nonet"], "unknown architecture nonet; choose from"),
        (["--protocol", "nope"], f"unknown evaluation protocol 'nope'; choose one of {', '.join(sorted(PROTOCOLS))}"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        ([], "give the distilled set"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["evaluate", *(["s.pt"] if bad else []), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_registered_command_dispatches(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = []
    before = list(cli.COMMANDS)  # the built-in commands (fit, evaluate, teachers, ...)
    cli.register_command("greet", "say hello", lambda argv: seen.append(argv) or "done")
    cli.register_command("dump", "print the arguments as JSON", "json:dumps", example="lightning-distill dump a")
    assert main(["greet", "--config", "t.yaml"]) == "done" and seen == [["--config", "t.yaml"]]
    assert main(["dump", "a", "b"]) == '["a", "b"]'
    main(["--help"])
    printed = capsys.readouterr().out
    assert f"usage: lightning-distill {{{','.join([*before, 'greet', 'dump'])}}}" in printed
    assert "say hello" in printed and "lightning-distill dump a" in printed
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command("fit", "again", lambda argv: None)
    with pytest.raises(ValueError, match="refused"):
        cli.register_command("validate", "no", lambda argv: None)
    with pytest.raises(SystemExit) as e:
        main(["nosuch"])
    known = ", ".join([*before, "greet", "dump"])
    assert e.value.code == 2 and f"unknown command 'nosuch'; choose from {known}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_are_refused(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--config", "recipes/random/mnist_ipc1.yaml"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1 and "does not apply to a distillation method" in err
    assert command not in cli.usage().split("commands:")[0]


def test_console_script_help():
    exe = Path(sys.executable).with_name("lightning-distill")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0 and "evaluate" in r.stdout and "fit" in r.stdout
    assert "validate" not in r.stdout and "{fit,evaluate" in r.stdout
    assert torch.__version__  # the console script runs in the same environment
