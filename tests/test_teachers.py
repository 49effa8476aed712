"""The teacher pool: training with validation selection, the provenance cache, refusals, the ``teachers`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_distill.components.teachers as teachers_mod
from lightning_distill.components import TeacherPoolError, TeacherSpec, load_teacher_pool
from lightning_distill.components.teachers import pool_folder, pool_provenance, train_teacher
from lightning_distill.data import ArrayDataModule
from lightning_distill.nets import get_net
from tests.helpers import mnist_subset, tiny_mnist_dm

TINY = {"arch_kwargs": {"width": 8}, "epochs": 1}


def _setup(dm):
    dm.setup("fit")
    return dm


@pytest.fixture
def counted(monkeypatch):
    """Count the teachers actually trained."""
    calls = []
    original = teachers_mod.train_teacher

    def spy(dm, spec, index, *args, **kwargs):
        calls.append(index)
        return original(dm, spec, index, *args, **kwargs)

    monkeypatch.setattr(teachers_mod, "train_teacher", spy)
    return calls


def test_a_teacher_learns_and_is_chosen_on_the_validation_split(data_root):
    dm = _setup(tiny_mnist_dm(data_root))
    spec = TeacherSpec(arch_kwargs={"width": 16}, num_teachers=1, epochs=3)
    state, record = train_teacher(dm, spec, 0, device="cpu")
    net = get_net("convnet", 1, 10, 28, width=16)
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        val_acc = float((net(dm.x_val).argmax(1) == dm.y_val).float().mean() * 100)
        test_acc = float((net(dm.x_test).argmax(1) == dm.y_test).float().mean() * 100)
    # The kept state is the one whose validation accuracy was recorded; it learned (chance is 10 %).
    assert record["val_acc"] == pytest.approx(val_acc, abs=1e-3) and val_acc > 30
    assert 0 <= record["best_epoch"] < 3 and record["seconds"] > 0
    assert record["test_acc"] == pytest.approx(test_acc, abs=1e-3)  # reported, never used to choose


def test_the_cache_trains_once_and_grows_by_what_is_missing(data_root, tmp_cache, counted):
    dm = _setup(tiny_mnist_dm(data_root))
    first = load_teacher_pool(dm, TeacherSpec(num_teachers=1, **TINY), device="cpu")
    assert counted == [0] and first.folder.parent == tmp_cache / "teachers"
    again = load_teacher_pool(_setup(tiny_mnist_dm(data_root)), TeacherSpec(num_teachers=1, **TINY), device="cpu")
    assert counted == [0]  # a cache hit trains nothing
    for a, b in zip(first.states[0].values(), again.states[0].values(), strict=True):
        assert torch.equal(a, b)
    grown = load_teacher_pool(dm, TeacherSpec(num_teachers=2, **TINY), device="cpu")
    assert counted == [0, 1] and len(grown) == 2 and grown.folder == first.folder  # the count is not in the key
    # Another recipe is another pool.
    other = load_teacher_pool(dm, TeacherSpec(num_teachers=1, lr=0.01, **TINY), device="cpu")
    assert other.folder != first.folder and counted == [0, 1, 0]


def test_a_missing_or_mismatched_pool_is_refused_in_one_line(data_root, tmp_cache, tmp_path):
    dm = _setup(tiny_mnist_dm(data_root))
    spec = TeacherSpec(num_teachers=1, **TINY)
    with pytest.raises(TeacherPoolError, match=r"no complete teacher pool for mnist .*`lightning-distill teachers"):
        load_teacher_pool(dm, spec, build=False)
    folder = tmp_path / "pool"
    load_teacher_pool(dm, spec, folder=folder, device="cpu")
    cases = {
        "preprocessing": _setup(tiny_mnist_dm(data_root, normalize=False)),
        "dataset 'mnist' instead of 'fashion_mnist'": _setup(_fashion(data_root)),
        "class count 10 instead of 9": _setup(_nine_classes(data_root)),
    }
    for what, other in cases.items():
        with pytest.raises(TeacherPoolError) as err:
            load_teacher_pool(other, spec, folder=folder, build=True)
        message = str(err.value)
        assert what in message and "build the right one with `lightning-distill teachers" in message, message
        assert "\n" not in message
    # The cache keys differ, so without an explicit folder each of them gets its own pool.
    assert len({pool_folder(pool_provenance(d, spec)) for d in [dm, *cases.values()]}) == 4


def _fashion(root):
    from lightning_distill.data import FashionMNISTDataModule

    x, y = FashionMNISTDataModule(root=str(root)).load_split("train")
    x_te, y_te = FashionMNISTDataModule(root=str(root)).load_split("test")
    return ArrayDataModule(
        x_train=x[:600], y_train=y[:600], x_test=x_te[:100], y_test=y_te[:100], name="fashion_mnist", val_size=100
    )


def _nine_classes(root):
    x, y, x_te, y_te = mnist_subset(root)
    keep, keep_te = y < 9, y_te < 9
    return ArrayDataModule(
        x_train=x[keep],
        y_train=y[keep],
        x_test=x_te[keep_te],
        y_test=y_te[keep_te],
        name="mnist",
        classes=[str(c) for c in range(9)],
        val_size=100,
    )


def _recipe(tmp_path, data_root, method="lightning_distill.methods.APM", extra=""):
    x, y, x_te, y_te = mnist_subset(data_root)
    npz = tmp_path / "mnist600.npz"
    np.savez(npz, x_train=x.numpy(), y_train=y.numpy(), x_test=x_te.numpy(), y_test=y_te.numpy())
    init = (
        "    arch_kwargs: {width: 8}\n"
        "    teachers: {arch_kwargs: {width: 8}, num_teachers: 2, epochs: 1}\n"
        "    student_epochs: 2\n"
        "    num_checkpoints: 1\n"
        if method.endswith("APM")
        else ""
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "trainer: {max_steps: 1}\n"
        f"model:\n  class_path: {method}\n  init_args:\n{init}{extra}"
        "    synthetic: {class_path: lightning_distill.synthetic.PixelSet, init_args: {ipc: 1}}\n"
        f"data:\n  class_path: lightning_distill.data.ArrayDataModule\n"
        f"  init_args: {{path: {npz}, name: mnist, val_size: 100}}\n"
    )
    return path


def test_the_teachers_command_builds_the_pool_fit_uses(data_root, tmp_cache, tmp_path, counted, capsys):
    from lightning_distill.cli import main

    recipe = _recipe(tmp_path, data_root)
    summary = main(["teachers", "--config", str(recipe), "--no-progress", "--device", "cpu"])
    assert counted == [0, 1] and summary["teachers"] == 2 and summary["val_acc"] is not None
    out = capsys.readouterr().out
    assert "teacher pool: 2 x convnet" in out and "reported only" in out
    # fit finds the same pool: nothing is trained again.
    main(
        [
            "fit",
            "--config",
            str(recipe),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
        ]
    )
    assert counted == [0, 1]


def test_the_teachers_command_refuses_a_method_without_teachers(data_root, tmp_path, capsys):
    from lightning_distill.cli import main

    recipe = _recipe(tmp_path, data_root, method="lightning_distill.methods.RandomSubset")
    with pytest.raises(SystemExit):
        main(["teachers", "--config", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uses no teacher pool" in err[0] and "recipes/apm/" in err[0]


def test_fit_without_a_pool_and_build_off_says_how_to_build_it(data_root, tmp_cache, tmp_path, capsys):
    from lightning_distill.cli import main

    recipe = _recipe(tmp_path, data_root, extra="    build_teachers: false\n")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(recipe),
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--trainer.logger=false",
                "--trainer.accelerator=cpu",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no complete teacher pool for mnist" in err and "lightning-distill teachers --config" in err
