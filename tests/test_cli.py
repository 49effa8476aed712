"""End to end: `lightning-distill fit` with a recipe, the export, then `lightning-distill evaluate`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.export import load_distilled

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
    written = json.loads((out / "distilled_eval_dc.json").read_text())
    assert {"date", "hardware", "torch", "commit"} <= set(written["stamp"])
    res = written["results"]
    assert [r["arch"] for r in res] == ["lenet", "mlp"] and all(len(r["accuracies"]) == 2 for r in res)
    assert all(0 <= a <= 100 for r in res for a in r["accuracies"])

    # --arch-kwargs reaches the network (and is recorded): a width-8 krr network instead of the protocol's 128.
    args = ["evaluate", str(out / "distilled.pt"), "--protocol", "krr", "--repeats", "1", "--steps", "2"]
    main([*args, "--arch-kwargs", '{"width": 8}', "--no-progress", "--output", str(tmp_path / "w8.json")])
    (r,) = json.loads((tmp_path / "w8.json").read_text())["results"]
    assert r["arch"] == "convnet_frepo" and r["extra"]["arch_kwargs"] == {"norm": "none", "width": 8}
    for bad in ("{width: 8}", "[8]"):
        with pytest.raises(SystemExit):
            main([*args, "--arch-kwargs", bad])
        assert "--arch-kwargs must be a JSON object" in capsys.readouterr().err


def test_wandb_offline_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    main(_fit_args("recipes/random/mnist_ipc1.yaml", data_root, out, f"--trainer.logger.init_args.save_dir={out}"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert load_distilled(out / "distilled.pt")["ipc"] == 1


def test_evaluate_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no distilled set"):
        main(["evaluate", str(tmp_path / "missing.pt")])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        main(["evaluate", str(bad)])
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


def test_console_script_help():
    exe = Path(sys.executable).with_name("lightning-distill")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0 and "evaluate" in r.stdout and "fit" in r.stdout
    assert torch.__version__  # the console script runs in the same environment
