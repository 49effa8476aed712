"""Every recipe parses and instantiates through the CLI (no training)."""

from pathlib import Path

import pytest

from lightning_distill.cli import cli_main
from lightning_distill.methods import DistillationMethod

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def test_recipe_layout():
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    assert {"random/mnist_ipc1.yaml", "random/mnist_ipc10.yaml"} <= names
    frepo = {n for n in names if n.startswith("frepo/")}
    cells = [f"frepo/{d}_ipc{k}.yaml" for d in ("mnist", "fashion_mnist", "cifar10", "cifar100") for k in (1, 10, 50)]
    cells += ["frepo/tiny_imagenet_ipc1.yaml", "frepo/tiny_imagenet_ipc10.yaml"]
    cells += [f"frepo/{d}_ipc{k}_cpu.yaml" for d in ("mnist", "fashion_mnist") for k in (1, 10)]
    assert set(cells) <= frepo
    rcig = {n for n in names if n.startswith("rcig/")}
    cells = [f"rcig/{d}_ipc{k}.yaml" for d in ("mnist", "fashion_mnist", "cifar10", "cifar100") for k in (1, 10, 50)]
    cells += [f"rcig/tiny_imagenet_ipc{k}.yaml" for k in (1, 10)] + [f"rcig/imagenet64_ipc{k}.yaml" for k in (1, 2)]
    cells += [f"rcig/{d}_ipc{k}.yaml" for d in ("imagenette", "imagewoof") for k in (1, 10)]
    cells += [f"rcig/{d}_ipc{k}_cpu.yaml" for d in ("mnist", "fashion_mnist") for k in (1, 10)]
    assert set(cells) <= rcig


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_instantiates(recipe, tmp_path):
    cli = cli_main(
        ["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False
    )
    assert isinstance(cli.model, DistillationMethod)
    assert cli.model.synthetic.ipc == int(recipe.stem.split("ipc")[1].split("_")[0])
    assert cli.datamodule.name in recipe.stem
