"""Wrong input gets one line naming the fix (exit code 2), not a traceback; wrong results are refused, not written."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lightning_distill.cli as cli
from lightning_distill.cli import main
from lightning_distill.data import DatasetNotFoundError, ImageFolderDataModule
from lightning_distill.eval import evaluate_distilled
from lightning_distill.export import ExportError, load_distilled, save_distilled
from tests.test_safety import export_payload

REPO = Path(__file__).resolve().parents[1]
RANDOM = REPO / "recipes" / "random" / "mnist_ipc1.yaml"
FREPO = REPO / "recipes" / "frepo" / "mnist_ipc1.yaml"


def error_of(capsys: pytest.CaptureFixture[str], command: list[str]) -> str:
    """Run ``lightning-distill COMMAND``; it must exit 2 with exactly one error line and no traceback: that line."""
    with pytest.raises(SystemExit) as e:
        main(command)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if f"lightning-distill {command[0]}: error: " in line]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0].split(": error: ", 1)[1]


def fit_args(tmp_path: Path, data_root: Path, recipe: Path = RANDOM, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(recipe),
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.init_args.root={data_root}",
        "--data.init_args.download=false",
        "--trainer.logger=false",
        *extra,
    ]


def recipe_with(tmp_path: Path, change) -> Path:
    """A copy of the random-real recipe with ``change(config)`` applied."""
    config = yaml.safe_load(RANDOM.read_text())
    change(config)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def mnist_export(tmp_path: Path, data_root: Path) -> Path:
    """A valid 10-image MNIST export whose test split is the fixture's."""
    return save_distilled(export_payload(init_args={"root": str(data_root)}), tmp_path / "set" / "distilled.pt")


# --------------------------------------------------------------------------------------------------------- fit
def _ipc(n):
    def change(c):
        c["model"]["init_args"]["synthetic"]["init_args"]["ipc"] = n

    return change


def _misspelt(c):
    c["model"]["init_args"]["synthetic"]["init_args"]["ipcc"] = c["model"]["init_args"]["synthetic"]["init_args"].pop(
        "ipc"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_ipc(0), "ipc must be a positive integer (images per class), got 0"),
        (_ipc(-3), "ipc must be a positive integer (images per class), got -3"),
        (
            _misspelt,
            "model.init_args.synthetic.init_args.ipcc: no such option of lightning_distill.synthetic.PixelSet (it "
            "takes centred, image_shape, init, ipc, label_scale, labels, num_classes): check the spelling",
        ),
        (lambda c: c["trainer"].update(max_stepz=1), "trainer.max_stepz: no such option: check the spelling"),
    ],
    ids=["ipc0", "ipc-3", "misspelt-key", "misspelt-trainer-key"],
)
def test_bad_recipes_say_one_line(change, message, tmp_path, data_root, capsys):
    assert error_of(capsys, fit_args(tmp_path, data_root, recipe_with(tmp_path, change))).startswith(message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.synthetic.init_args.ipcc=1"], "model.init_args.synthetic.init_args.ipcc: no such option"),
        (
            ["--model.class_path=lightning_distill.methods.FRePoo"],
            "model: no class lightning_distill.methods.FRePoo to import; known: lightning_distill.methods.APM, ",
        ),
        (["--data=lightning_distill.data.MNISTDataModul"], "data: no class lightning_distill.data.MNISTDataModul "),
        (["--trainer.max_steps=abc"], "--trainer.max_steps: expected int"),
    ],
    ids=["misspelt-option", "unknown-method", "unknown-dataset", "bad-value"],
)
def test_bad_fit_options_say_one_line(extra, message, tmp_path, data_root, capsys):
    assert error_of(capsys, fit_args(tmp_path, data_root, RANDOM, *extra)).startswith(message)


def test_missing_data_root_names_the_root_and_the_fix(tmp_path, capsys):
    line = error_of(capsys, fit_args(tmp_path, tmp_path / "nope", RANDOM))
    assert line.startswith(f"data root {tmp_path / 'nope'} does not exist: set root (a recipe's data.init_args.root")
    assert "LIGHTNING_DISTILL_DATA" in line and "download=True" in line
    line = error_of(capsys, fit_args(tmp_path, tmp_path, RANDOM))  # a folder without MNIST in it
    assert line.startswith(
        f"mnist not found under {tmp_path} (expected {tmp_path / 'MNIST/raw/train-images-idx3-ubyte'})"
    )


def test_unknown_architecture_in_a_recipe(tmp_path, data_root, capsys):
    extra = ["--model.init_args.arch=convnett", "--trainer.max_steps=1", "--trainer.enable_checkpointing=false"]
    line = error_of(capsys, fit_args(tmp_path, data_root, FREPO, *extra, "--trainer.callbacks=[]"))
    assert line.startswith("unknown net 'convnett'; known nets: alexnet, convnet, ")


def test_debug_shows_the_traceback(tmp_path, data_root, monkeypatch):
    args = fit_args(tmp_path, data_root, recipe_with(tmp_path, _ipc(0)))
    with pytest.raises(ValueError, match="ipc must be a positive integer"):
        main([*args, "--debug"])
    monkeypatch.setenv("LIGHTNING_DISTILL_DEBUG", "1")
    with pytest.raises(ValueError, match="ipc must be a positive integer"):
        main(args)


def test_errors_of_any_command_are_one_line(monkeypatch, capsys):
    from lightning_distill.methods import NonFiniteMetaStep

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    message = "20 outer steps in a row had a non-finite meta-gradient (up to step 20): lower the learning rate"

    def stops(argv):
        raise NonFiniteMetaStep(message)

    def missing_key(argv):
        raise KeyError("x.npz lacks y_test: the file must hold x_train, y_train, x_test, y_test")

    def bug(argv):
        raise ZeroDivisionError("a bug, not an input")

    cli.register_command("stops", "", stops)
    cli.register_command("keys", "", missing_key)
    cli.register_command("bug", "", bug)
    assert error_of(capsys, ["stops"]) == message
    assert error_of(capsys, ["keys"]).startswith("x.npz lacks y_test")  # not quoted as str(KeyError) would
    with pytest.raises(ZeroDivisionError):  # a program error keeps its traceback
        main(["bug"])


def test_fit_starts_without_warnings_a_user_cannot_act_on(tmp_path, data_root, caplog):
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(fit_args(tmp_path, data_root, RANDOM))
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "validation_step" in m or "LeafSpec" in m], messages
    assert "Tip: For seamless cloud" not in caplog.text
    assert (tmp_path / "run" / "distilled.pt").is_file()


# ---------------------------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("option", ["--steps", "--epochs"])
def test_a_length_that_trains_nothing_is_refused(option, capsys):
    line = error_of(capsys, ["evaluate", "s.pt", option, "0"])
    assert line.startswith(f"{option} must be at least 1, got 0: 0 {option[2:]} would score an untrained network")
    with pytest.raises(ValueError, match="would score an untrained network"):
        evaluate_distilled("s.pt", **{option[2:]: 0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_at_start(capsys):
    line = error_of(capsys, ["evaluate", "s.pt", "--device", "cuda"])
    assert line.startswith("device 'cuda' asked for, but no CUDA GPU is available here")
    assert error_of(capsys, ["evaluate", "s.pt", "--device", "gpu"]).startswith("device 'gpu' is not a device")


def test_a_misspelt_network_option_lists_the_accepted_ones(capsys):
    line = error_of(capsys, ["evaluate", "s.pt", "--arch", "mlp,convnet", "--arch-kwargs", '{"widht": 8}'])
    assert line == "--arch-kwargs: mlp takes no option widht; it takes width"
    line = error_of(capsys, ["evaluate", "s.pt", "--arch-kwargs", '{"width": 8, "dpeth": 2}'])  # dc's convnet
    assert line.startswith("--arch-kwargs: convnet takes no option dpeth; it takes activation, bn_momentum, depth, ")
    assert error_of(capsys, ["evaluate", "s.pt", "--arch", "lenet", "--arch-kwargs", '{"width": 8}']).endswith(
        "lenet takes no option width; it takes no options"
    )
    assert error_of(capsys, ["evaluate", "s.pt", "--arch", "convnett"]).startswith("unknown architecture convnett")


def test_a_set_of_another_shape_than_its_dataset_is_refused(tmp_path, data_root, capsys):
    path = save_distilled(export_payload(init_args={"root": str(data_root)}, shape=(1, 20, 20)), tmp_path / "s.pt")
    line = error_of(capsys, ["evaluate", str(path), "--steps", "1", "--repeats", "1"])
    assert "the set's images are 1x20x20 and its recorded preprocessing is for 1x20x20, but the rebuilt test " in line
    assert "split of mnist is 1x28x28" in line


def test_values_that_cannot_be_right_are_refused_at_load(tmp_path, capsys):
    labels = export_payload()
    labels["labels"][3] = 10
    images = export_payload()
    images["images"][0, 0, 0, 0] = float("inf")
    soft = export_payload()
    soft["labels"] = torch.full((10, 10), float("nan"))
    for name, payload, message in [
        ("labels", labels, r"hard labels must be class ids in \[0, 10\), but 1 are not \(e.g. 10\)"),
        ("images", images, "images contain NaN or infinity"),
        ("soft", soft, "labels contain NaN or infinity"),
    ]:
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)  # not save_distilled, which refuses to write them
        with pytest.raises(ExportError, match=message):
            load_distilled(path)
        with pytest.raises(ExportError, match=message):
            save_distilled(payload, tmp_path / "again.pt")
    assert "hard labels must be class ids" in error_of(capsys, ["evaluate", str(tmp_path / "labels.pt")])


def test_every_evaluation_keeps_its_file(mnist_export, capsys):
    def evaluate(*extra: str) -> str:
        main(["evaluate", str(mnist_export), "--arch", "mlp", "--repeats", "1", "--no-progress", *extra])
        return capsys.readouterr().out.splitlines()[-1]

    folder = mnist_export.parent
    assert evaluate("--steps", "2") == f"wrote {folder / 'distilled_eval_dc_mlp_r1_s2.json'}"
    assert evaluate("--steps", "1") == f"wrote {folder / 'distilled_eval_dc_mlp_r1_s1.json'}"
    assert evaluate("--steps", "1").startswith(f"wrote {folder / 'distilled_eval_dc_mlp_r1_s1-2.json'} (")
    assert evaluate("--steps", "1", "--seed", "4", "--arch-kwargs", '{"width": 16}').startswith(
        f"wrote {folder / 'distilled_eval_dc_mlp_r1_s1_seed4_'}"
    )
    names = {p.name: json.loads(p.read_text())["results"][0]["steps"] for p in folder.glob("*.json")}
    assert len(names) == 4  # the 2-step result was not replaced by a 1-step one, nor a 1-step one by its repeat
    assert {k: v for k, v in names.items() if "seed" not in k} == {
        "distilled_eval_dc_mlp_r1_s2.json": 2,
        "distilled_eval_dc_mlp_r1_s1.json": 1,
        "distilled_eval_dc_mlp_r1_s1-2.json": 1,
    }
    out = folder / "mine.json"
    out.write_text("{}")
    assert evaluate("--steps", "1", "--output", str(out)).startswith(f"wrote {folder / 'mine-2.json'} ({out} exists")
    assert evaluate("--steps", "1", "--output", str(out), "--overwrite") == f"wrote {out}"
    assert json.loads(out.read_text())["results"][0]["steps"] == 1


# -------------------------------------------------------------------------------------------------------- data
def test_an_image_folder_class_without_images_is_refused_naming_the_folder(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / cls / "0.png")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(path=str(tmp_path), image_size=4, val_size=0)
    with pytest.raises(DatasetNotFoundError, match=f"class folder {tmp_path / 'train' / 'empty'} holds no images"):
        dm.setup()
