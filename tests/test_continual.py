"""The class-incremental protocol: orders, splits, which classes are trained and tested at each step, the callback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_distill.eval.continual as continual
from lightning_distill.callbacks import ContinualLearningEval
from lightning_distill.eval.continual import (
    Memory,
    class_orders,
    embed_labels,
    random_memory,
    run_continual,
    split_classes,
    step_datamodule,
)
from lightning_distill.methods import RandomSubset
from lightning_distill.synthetic import PixelSet
from tests.helpers import mnist_subset, quiet_trainer, tiny_mnist_dm


def test_orders_are_the_fields_seeded_permutations():
    orders = class_orders(100, [0, 1, 2, 3, 4])
    for s, order in enumerate(orders):
        assert order == np.random.RandomState(s).permutation(100).tolist()
    assert len({tuple(o) for o in orders}) == 5
    assert class_orders(10, [0])[0] != class_orders(10, [1])[0]


def test_splits_cover_the_order_in_equal_steps():
    order = class_orders(10, [0])[0]
    splits = split_classes(order, 5)
    assert [len(s) for s in splits] == [2] * 5 and sum(splits, []) == order
    assert len(split_classes(list(range(100)), 10)[3]) == 10
    with pytest.raises(ValueError, match=r"10 classes do not split into 3 equal steps: use one of \[1, 2, 5, 10\]"):
        split_classes(range(10), 3)
    with pytest.raises(ValueError, match="lists a class twice"):
        split_classes([0, 1, 1, 2], 2)


def test_embed_labels_maps_local_ids_and_float_targets():
    assert embed_labels(torch.tensor([0, 1, 1]), [7, 3], 10).tolist() == [7, 3, 3]
    y = torch.tensor([[0.5, -0.5], [-0.4, 0.6]])
    out = embed_labels(y, [7, 3], 10)
    assert out.shape == (2, 10) and out.argmax(1).tolist() == [7, 3]
    assert out[0, 7] == 0.5 and out[0, 3] == -0.5 and out[0, 0] == -0.5
    assert out[1, 3] == pytest.approx(0.6) and out[1, 9] == pytest.approx(-0.4)


def test_each_step_trains_on_all_memory_and_tests_on_seen_classes(monkeypatch):
    """A spy in place of the training: at step s the network sees every class so far, and only those are tested."""
    calls = []

    def spy(images, labels, x_test, y_test, **kwargs):
        calls.append((sorted(set(labels.tolist())), sorted(set(y_test.tolist())), len(images), kwargs["num_classes"]))

        class R:
            accuracies = [50.0 + len(calls)]

        return R()

    monkeypatch.setattr(continual, "train_on_distilled", spy)
    x_test = torch.randn(100, 1, 4, 4)
    y_test = torch.arange(10).repeat(10)
    splits = split_classes(class_orders(10, [1])[0], 5)
    requested = []

    def distil(step, classes):
        requested.append((step, classes))
        y = torch.tensor(classes).repeat_interleave(3)
        return Memory(torch.randn(len(y), 1, 4, 4), y, classes, len(y) * 16)

    def baseline(step, classes, memory):
        return Memory(memory.images.clone(), memory.labels.clone(), classes, memory.storage_floats)

    result = run_continual(distil, splits, x_test, y_test, 10, random_baseline=baseline, log=None)
    assert requested == list(enumerate(splits))
    seen = []
    for s, split in enumerate(splits):
        seen = sorted(seen + split)
        trained, tested, n_images, k = calls[2 * s]
        assert trained == seen and tested == seen and n_images == 3 * len(seen) and k == 10
        assert calls[2 * s + 1][:2] == (seen, seen)  # the baseline is trained and tested alike
        step = result.steps[s]
        assert step.new_classes == split and step.seen_classes == seen
        assert step.memory_images == 3 * len(seen) and step.memory_floats == 48 * len(seen)
        assert step.test_images == 10 * len(seen)
    assert result.curve == [51.0, 53.0, 55.0, 57.0, 59.0]
    assert result.random_curve == [52.0, 54.0, 56.0, 58.0, 60.0]
    assert result.average == pytest.approx(55.0)
    assert result.to_dict()["random_average"] == pytest.approx(56.0)


def test_distil_must_return_its_classes():
    def distil(step, classes):
        return Memory(torch.zeros(1, 1, 2, 2), torch.tensor([0]), [0], 4)

    with pytest.raises(ValueError, match=r"step 0: distil returned classes \[0\], expected \[3, 4\]"):
        run_continual(distil, [[3, 4]], torch.zeros(2, 1, 2, 2), torch.tensor([3, 4]), 5, log=None)


def test_step_datamodule_keeps_only_its_classes_in_the_parents_space(data_root):
    parent = tiny_mnist_dm(data_root)
    parent.setup("fit")
    dm = step_datamodule(parent, [7, 2], seed=0)
    dm.setup("fit")
    x_raw, y_raw = parent.load_split("train")
    assert dm.num_classes == 2 and dm.class_names == [parent.class_names[7], parent.class_names[2]]
    assert set(dm.y_train.tolist()) == {0, 1}
    assert len(dm.y_train) + len(dm.y_val) == int(((y_raw == 7) | (y_raw == 2)).sum())
    assert dm.preprocessing.mean == parent.preprocessing.mean and dm.preprocessing.std == parent.preprocessing.std
    sevens = parent.preprocessing.apply(x_raw[y_raw == 7].float() / 255)
    first = dm.x_train[dm.y_train == 0][0]
    assert (sevens - first).flatten(1).abs().amax(1).min() < 1e-5


def test_random_memory_draws_distinct_images_of_each_class(data_root):
    x, y, _, _ = mnist_subset(data_root)
    m = random_memory(x.float(), y, [3, 5], 4, torch.Generator().manual_seed(0))
    assert m.labels.tolist() == [3] * 4 + [5] * 4 and m.storage_floats == 8 * 784
    assert len({tuple(img.flatten().tolist()) for img in m.images}) == 8


def test_a_tiny_run_end_to_end(data_root):
    """Random real 'distillation' on a 600-image MNIST subset, 5 steps, short networks: numbers in range."""
    x, y, x_te, y_te = mnist_subset(data_root)
    x, x_te, y_te = x.float() / 255, x_te[:200].float() / 255, y_te[:200]
    g = torch.Generator().manual_seed(0)
    splits = split_classes(class_orders(10, [0])[0], 5)
    result = run_continual(
        lambda s, classes: random_memory(x, y, classes, 5, g),
        splits,
        x_te,
        y_te,
        10,
        protocol="dc",
        steps=15,
        arch_kwargs={"width": 8},
        flip=False,
        device="cpu",
        log=None,
    )
    assert len(result.curve) == 5 and all(0 <= a <= 100 for a in result.curve)
    assert result.steps[0].accuracies[0] > 50  # two classes: better than chance after 20 steps
    assert result.protocol["name"] == "dc"


def test_callback_scores_the_set_being_learned(data_root, tmp_path):
    cb = ContinualLearningEval(steps=5, orders=[0, 1], repeats=1, eval_steps=5, arch_kwargs={"width": 8})
    method = RandomSubset(synthetic=PixelSet(ipc=2), seed=0)
    trainer = quiet_trainer(tmp_path, 1, [cb])
    trainer.fit(method, datamodule=tiny_mnist_dm(data_root))
    entry = cb.history[-1]
    assert entry["step"] == 1 and len(entry["curve"]) == 5 and len(entry["results"]) == 2
    assert [r["order"] for r in entry["results"]] == class_orders(10, [0, 1])
    for r in entry["results"]:
        assert [len(s["seen_classes"]) for s in r["steps"]] == [2, 4, 6, 8, 10]
        assert [s["memory_images"] for s in r["steps"]] == [4, 8, 12, 16, 20]
    assert float(trainer.callback_metrics["eval/continual/acc_avg"]) == pytest.approx(entry["average"])
    assert cb.settings()["steps"] == 5


def test_callback_refuses_bad_settings(data_root, tmp_path):
    with pytest.raises(ValueError, match="orders must list distinct seeds"):
        ContinualLearningEval(orders=[0, 0])
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        ContinualLearningEval(protocol="nope")
    cb = ContinualLearningEval(steps=3)
    with pytest.raises(ValueError, match="10 classes do not split into 3 equal steps"):
        quiet_trainer(tmp_path, 1, [cb]).fit(
            RandomSubset(synthetic=PixelSet(ipc=1)), datamodule=tiny_mnist_dm(data_root)
        )


def test_the_whole_protocol_from_a_recipe(data_root, tmp_path):
    """Two orders of 2 steps through `run_continual_recipe`: each step is distilled from its own classes only."""
    from lightning_distill.eval.continual import run_continual_recipe

    results = run_continual_recipe(
        "recipes/random/mnist_ipc1.yaml",
        steps=2,
        orders=[0, 3],
        max_steps=1,
        eval_steps=2,
        arch_kwargs={"width": 8},
        overrides=[f"--data.init_args.root={data_root}", "--trainer.callbacks=[]"],
        run_dir=tmp_path,
        log=None,
    )
    assert [r.config["order_seed"] for r in results] == [0, 3]
    for r in results:
        assert r.splits == split_classes(class_orders(10, [r.config["order_seed"]])[0], 2)
        assert [s.memory_images for s in r.steps] == [5, 10]
        assert [s.seen_classes for s in r.steps] == [sorted(r.splits[0]), list(range(10))]
        assert r.steps[0].random_accuracies is not None
