"""A distilled-set file is data: loading or evaluating one never imports, calls or unpickles what the file names."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import lightning_distill.data as data
from lightning_distill.cli import main
from lightning_distill.data import RealDataModule, check_datamodule_record, register_datamodule
from lightning_distill.data.preprocess import Preprocessing
from lightning_distill.eval import evaluate_distilled
from lightning_distill.eval import test_split_for as rebuild_test_split  # not a test: pytest would collect it
from lightning_distill.export import ExportError, load_distilled, save_distilled

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MNIST = "lightning_distill.data.torchvision_sets.MNISTDataModule"


def export_payload(class_path: str = MNIST, init_args: dict | None = None, shape=(1, 28, 28), k: int = 10) -> dict:
    """A small, valid export of ``k`` classes recording the DataModule ``class_path(**init_args)``."""
    return {
        "images": torch.randn(k, *shape),
        "labels": torch.arange(k),
        "label_kind": "hard",
        "preprocessing": Preprocessing(mean=[0.1307], std=[0.3081], image_shape=shape).to_dict(),
        "dataset": "mnist",
        "datamodule": {"class_path": class_path, "init_args": dict(init_args or {})},
        "num_classes": k,
        "ipc": 1,
        "method": "Test",
        "config": {},
        "seed": 0,
        "version": 1,
    }


@pytest.fixture
def touch_file(tmp_path: Path) -> tuple[Path, Path]:
    """An export whose DataModule record is ``subprocess.run(["touch", flag])``, and the flag it would create."""
    flag = tmp_path / "touched"
    path = save_distilled(export_payload("subprocess.run", {"args": ["touch", str(flag)]}), tmp_path / "evil.pt")
    return path, flag


def test_a_file_naming_a_callable_is_refused_before_anything_runs(touch_file, capsys):
    path, flag = touch_file
    with pytest.raises(ValueError, match=r"names the DataModule 'subprocess.run', which is not registered"):
        evaluate_distilled(path, repeats=1, steps=1, progress=False)
    with pytest.raises(ValueError, match="register_datamodule"):
        rebuild_test_split(load_distilled(path))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(path), "--steps", "1", "--repeats", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nothing was imported or called" in err
    assert not flag.exists()


def test_cross_arch_refuses_a_file_naming_a_callable(touch_file, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cross_arch

    path, flag = touch_file
    with pytest.raises(SystemExit):
        cross_arch.main([str(path), "--arch", "mlp", "--repeats", "1", "--steps", "1", "--out", str(tmp_path / "o")])
    assert "not registered" in capsys.readouterr().err and not flag.exists()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"class_path": "os.system", "init_args": {"command": "true"}}, "not registered"),
        # A registered class's module with another attribute: compared as a whole string, never resolved.
        ({"class_path": "lightning_distill.data.torchvision_sets.datasets", "init_args": {}}, "not registered"),
        ({"class_path": MNIST, "init_args": {"root": torch.zeros(1)}}, "root of .* are not plain values"),
        ({"class_path": MNIST, "init_args": {"rooot": "/data"}}, "MNISTDataModule takes no argument rooot"),
        ({"class_path": None, "init_args": {}}, "has no class path"),
        ("subprocess.run", "not a mapping"),
    ],
)
def test_only_registered_classes_with_plain_accepted_arguments(record, message):
    with pytest.raises(ValueError, match=message):
        check_datamodule_record(record, "x.pt")


def test_the_registered_classes_are_the_projects():
    paths = data.registered_datamodules()
    assert paths[MNIST] is paths["lightning_distill.data.MNISTDataModule"] is data.MNISTDataModule
    assert {c.__name__ for c in paths.values()} == {
        *(c.__name__ for c in data.DATASETS.values()),
        "ArrayDataModule",
        "ImageFolderDataModule",
        "TinyImageNetDataModule",
    }
    # The recorded arguments of a real export pass (everything RealDataModule takes, through **kwargs).
    assert check_datamodule_record(
        {"class_path": "lightning_distill.data.folders.ImageFolderDataModule", "init_args": {"path": "p", "seed": 1}}
    )[1] == {"path": "p", "seed": 1}


class _SquaresDataModule(RealDataModule):
    """A user's own DataModule: 2 classes of 1x28x28 images."""

    name = "squares"
    num_classes = 2
    image_shape = (1, 28, 28)
    class_names = ["dark", "light"]

    def __init__(self, level: int = 200, **kwargs) -> None:
        super().__init__(**kwargs)
        self.level = level

    def _load_raw(self, split: str):
        y = torch.arange(8) % 2
        return (y * self.level).to(torch.uint8).view(8, 1, 1, 1).expand(8, 1, 28, 28).contiguous(), y


def test_a_registered_user_datamodule_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_REBUILDABLE", data.registered_datamodules())  # registrations end with the test
    path = f"{_SquaresDataModule.__module__}.{_SquaresDataModule.__qualname__}"
    payload = export_payload(path, {"level": 100, "seed": 3}, k=2)
    with pytest.raises(ValueError, match="not registered"):
        rebuild_test_split(payload)
    assert register_datamodule(_SquaresDataModule) is _SquaresDataModule
    x, y = rebuild_test_split(payload)
    assert x.shape == (8, 1, 28, 28) and y.tolist() == [0, 1] * 4
    with pytest.raises(TypeError, match="RealDataModule subclass"):
        register_datamodule(dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_datamodule(data.ArrayDataModule, path)


class _Evil:
    """Pickles as a call of ``subprocess.run`` (what a malicious file would carry)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (subprocess.run, (["touch", str(self.flag)],))


class _Custom:
    pass


def test_a_file_refused_by_weights_only_is_unsafe_not_corrupt(tmp_path, capsys):
    flag = tmp_path / "touched"
    evil = tmp_path / "evil.pt"
    torch.save({**export_payload(), "extra": _Evil(flag)}, evil)
    # (torch writes protocol-2 pickles, so subprocess.run is recorded under its Python 2 name, commands.run)
    with pytest.raises(ExportError, match=r"is unsafe: .* \(it names (subprocess|commands)\.run\).* not loaded"):
        load_distilled(evil)
    custom = tmp_path / "custom.pt"
    torch.save({**export_payload(), "config": _Custom()}, custom)
    with pytest.raises(ExportError, match=r"unsafe: it holds pickled objects beyond tensors and plain values") as e:
        load_distilled(custom)
    assert "corrupt" not in str(e.value) and "_Custom" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(evil)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is unsafe" in err
    assert not flag.exists()


def test_damaged_files_still_say_corrupt(tmp_path):
    good = save_distilled(export_payload(), tmp_path / "good.pt")
    for name, content in [("truncated", good.read_bytes()[: good.stat().st_size // 2]), ("zeros", b"\0" * 100)]:
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises(ExportError, match="corrupt or truncated") as e:
            load_distilled(bad)
        assert "unsafe" not in str(e.value)
