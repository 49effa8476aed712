"""CrossArchitectureEval: when it runs, what it logs, its checkpointed history, and what it must leave alone."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

import lightning_distill.callbacks.cross_arch as cross_arch
from lightning_distill.callbacks import CrossArchitectureEval
from lightning_distill.data import ArrayDataModule
from lightning_distill.methods import FRePo, RandomSubset
from lightning_distill.optim import CosineDecay
from lightning_distill.synthetic import PixelSet
from tests.helpers import mnist_subset, quiet_trainer, tiny_mnist_dm

TINY = {"archs": ["mlp", "lenet"], "steps": 3, "repeats": 1, "progress": False}


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass

    def steps_of(self, key: str) -> list[int | None]:
        return [step for step, m in self.rows if key in m]


def _frepo(seed: int = 0) -> FRePo:
    return FRePo(
        synthetic=PixelSet(ipc=1, labels="learned"),
        arch_kwargs={"width": 4},
        pool_size=2,
        syn_scheduler=lambda o: CosineDecay(o, total_steps=10),
        seed=seed,
    )


def _fit(root: Path, tmp_path: Path, callbacks: list, steps: int, method=None, logger=None, ckpt_path=None, dm=None):
    L.seed_everything(0, verbose=False)
    method = method if method is not None else RandomSubset(synthetic=PixelSet(ipc=1))
    trainer = quiet_trainer(tmp_path, steps, callbacks, logger=logger if logger is not None else False)
    dm = dm if dm is not None else tiny_mnist_dm(root, batch_size=32)
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    return method, dm, trainer


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the arguments of every train_on_distilled call the callback makes (and still runs it)."""
    seen: list[dict] = []
    real = cross_arch.train_on_distilled

    def spy(images, labels, x_test, y_test, **kwargs):
        seen.append({"images": images, "labels": labels, "x_test": x_test, "y_test": y_test, **kwargs})
        return real(images, labels, x_test, y_test, **kwargs)

    monkeypatch.setattr(cross_arch, "train_on_distilled", spy)
    return seen


def test_runs_every_n_steps_and_at_the_end_on_the_val_split(data_root, tmp_path, calls):
    cb, logger = CrossArchitectureEval(every_n_steps=2, **TINY), MemoryLogger()
    _, dm, trainer = _fit(data_root, tmp_path, [cb], steps=5, logger=logger)
    assert [(e["step"], e["arch"]) for e in cb.history] == [(s, a) for s in (2, 4, 5) for a in ("mlp", "lenet")]
    for arch in ("mlp", "lenet"):
        assert logger.steps_of(f"eval/{arch}/acc") == [2, 4, 5]
        assert logger.steps_of(f"eval/{arch}/acc_std") == [2, 4, 5]
        assert float(trainer.callback_metrics[f"eval/{arch}/acc"]) == cb.history[-1 if arch == "lenet" else -2]["mean"]
    e = cb.history[0]
    assert e["protocol"] == "dc" and e["split"] == "val" and len(e["accuracies"]) == 1
    assert 0 <= e["mean"] <= 100 and e["std"] == 0.0
    # Selection data only: every network was tested on the held-out validation split, never on the test split.
    assert all(c["x_test"] is dm.x_val and c["y_test"] is dm.y_val for c in calls)
    # Digits are never flipped; seeds follow the step; the step override and arch are passed through.
    assert [c["seed"] for c in calls] == [2, 2, 4, 4, 5, 5] and not any(c["flip"] for c in calls)
    assert all(c["steps"] == 3 and c["repeats"] == 1 and c["protocol"] == "dc" for c in calls)


def test_last_periodic_step_is_not_evaluated_twice_and_test_split_on_request(data_root, tmp_path, calls):
    cb = CrossArchitectureEval(every_n_steps=2, split="test", archs=["mlp"], steps=2, repeats=2, progress=False)
    _, dm, _ = _fit(data_root, tmp_path, [cb], steps=4)
    assert [e["step"] for e in cb.history] == [2, 4]
    assert all(c["x_test"] is dm.x_test for c in calls) and cb.history[0]["split"] == "test"
    assert len(cb.history[0]["accuracies"]) == 2


def test_only_at_the_end_by_default_with_arch_kwargs(data_root, tmp_path, calls):
    cb = CrossArchitectureEval(archs=["mlp"], arch_kwargs={"mlp": {"width": 16}}, steps=2, repeats=1, progress=False)
    assert cb.every_n_steps == 0 and cb.split == "val"
    _fit(data_root, tmp_path, [cb], steps=3)
    assert [e["step"] for e in cb.history] == [3]
    assert calls[0]["arch_kwargs"] == {"width": 16}


def test_history_survives_checkpoint_and_resume(data_root, tmp_path):
    first = CrossArchitectureEval(every_n_steps=2, **TINY)
    _, _, trainer = _fit(data_root, tmp_path / "a", [first], steps=2)
    assert [e["step"] for e in first.history] == [2, 2]
    ckpt = tmp_path / "a" / "step2.ckpt"
    trainer.save_checkpoint(ckpt)

    # The state is in the checkpoint's "callbacks" entry, under the callback's own key.
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    restored = CrossArchitectureEval(every_n_steps=2, **TINY)
    restored.load_state_dict(state)
    assert restored.history == first.history

    resumed = CrossArchitectureEval(every_n_steps=2, **TINY)
    _fit(data_root, tmp_path / "b", [resumed], steps=4, ckpt_path=str(ckpt))
    assert resumed.history[:2] == first.history
    assert [e["step"] for e in resumed.history] == [2, 2, 4, 4]


def test_two_instances_keep_separate_state():
    a = CrossArchitectureEval(archs=["mlp"], protocol="dc")
    b = CrossArchitectureEval(archs=["mlp"], protocol="krr")
    assert a.state_key != b.state_key


def test_leaves_the_set_the_rng_and_the_modes_alone(data_root, tmp_path):
    # A run with the callback learns exactly the same set as a run without it.
    plain, _, _ = _fit(data_root, tmp_path / "a", [], steps=3, method=_frepo())
    cb = CrossArchitectureEval(every_n_steps=1, **TINY)
    method, _, trainer = _fit(data_root, tmp_path / "b", [cb], steps=3, method=_frepo())
    assert [e["step"] for e in cb.history] == [1, 1, 2, 2, 3, 3]
    for a, b in zip(plain.synthetic(), method.synthetic(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # A direct call: the parameters, the global RNG and every submodule's mode are as before.
    before = {k: v.clone() for k, v in method.synthetic.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in method.synthetic.parameters()]
    method.train()
    method.synthetic.eval()
    rng = torch.get_rng_state()
    entries = cb.evaluate(trainer, method)
    assert torch.equal(torch.get_rng_state(), rng)
    assert method.training and not method.synthetic.training
    for k, v in method.synthetic.state_dict().items():
        assert torch.equal(v, before[k]), k
    for g, p in zip(grads, method.synthetic.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    # Reproducible: the same step gives the same networks, hence the same accuracies.
    assert [e["accuracies"] for e in entries] == [e["accuracies"] for e in cb.history[-4:-2]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"archs": ["mlp", "nope"]}, "unknown: nope"),
        ({"archs": []}, "at least one"),
        ({"archs": ["mlp", "mlp"]}, "twice"),
        ({"repeats": 0}, "repeats"),
        ({"every_n_steps": -1}, "every_n_steps"),
        ({"split": "train"}, "split"),
        ({"protocol": "nope"}, "unknown evaluation protocol"),
        ({"archs": ["mlp"], "arch_kwargs": {"lenet": {}}}, "not evaluated"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossArchitectureEval(**kwargs)


def test_one_name_is_one_arch_and_defaults():
    assert CrossArchitectureEval(archs="mlp").archs == ["mlp"]
    assert CrossArchitectureEval().archs == ["convnet", "alexnet", "vgg11", "resnet18"]


def test_missing_validation_split_fails_at_setup(data_root, tmp_path):
    x_tr, y_tr, x_te, y_te = mnist_subset(data_root)
    dm = ArrayDataModule(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, name="mnist", val_size=0)
    with pytest.raises(ValueError, match="val_size > 0"):
        _fit(data_root, tmp_path, [CrossArchitectureEval(**TINY)], steps=1, dm=dm)


def test_built_from_a_recipe_by_the_cli(tmp_path):
    from lightning_distill.cli import cli_main

    repo = Path(__file__).resolve().parents[1]
    cli = cli_main(
        [
            "--config",
            str(repo / "recipes/random/mnist_ipc1.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks+=CrossArchitectureEval",
            "--trainer.callbacks.every_n_steps=50",
            "--trainer.callbacks.archs=[mlp, lenet]",
            "--trainer.callbacks.split=val",
            "--trainer.callbacks+=SyntheticImageLogger",
            "--trainer.callbacks.every_n_steps=10",
        ],
        run=False,
    )
    cross = [c for c in cli.trainer.callbacks if isinstance(c, CrossArchitectureEval)]
    assert len(cross) == 1 and cross[0].archs == ["mlp", "lenet"] and cross[0].every_n_steps == 50
    from lightning_distill.callbacks import SyntheticImageLogger

    images = [c for c in cli.trainer.callbacks if isinstance(c, SyntheticImageLogger)]
    assert len(images) == 1 and images[0].every_n_steps == 10
