import pytest
import torch

from lightning_distill.eval import EvalResult, get_protocol, train_on_distilled
from lightning_distill.eval.protocols import make_schedule
from tests.helpers import mnist_subset


def _sets(root, ipc=10):
    x_tr, y_tr, x_te, y_te = mnist_subset(root)
    idx = torch.cat([torch.nonzero(y_tr == c).flatten()[:ipc] for c in range(10)])
    norm = lambda x: (x.float() / 255 - 0.1307) / 0.3081  # noqa: E731
    return norm(x_tr[idx]), y_tr[idx], norm(x_te), y_te


def test_protocol_lengths():
    dc, krr = get_protocol("dc"), get_protocol("krr")
    assert dc.num_steps(10) == 1000 and dc.num_steps(100) == 1000 and dc.num_steps(500) == 2000
    assert krr.num_steps(10) == 1000 and krr.num_steps(100) == 2000 and krr.num_steps(1000) == 10000
    assert krr.num_steps(50) == 2000  # between table entries: the next larger one
    assert dc.num_steps(10, epochs=3) == 3 and krr.num_steps(10, steps=7) == 7
    with pytest.raises(ValueError, match="choose one of .*dc, krr"):
        get_protocol("nope")


def test_schedules():
    f = make_schedule(get_protocol("dc"), 100)
    assert f(0) == 1.0 and f(49) == 1.0 and f(50) == 0.1
    g = make_schedule(get_protocol("krr"), 2000)
    assert g(0) == pytest.approx(1 / 500) and g(499) == pytest.approx(1.0)
    assert g(1999) == pytest.approx(0.01, abs=1e-4)
    assert g(1250) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-3)


def test_dc_training_learns_from_real_images(data_root):
    x, y, x_te, y_te = _sets(data_root)
    r = train_on_distilled(x, y, x_te, y_te, protocol="dc", arch="lenet", repeats=2, steps=150, progress=False)
    assert isinstance(r, EvalResult) and len(r.accuracies) == 2 and r.steps == 150
    assert r.mean > 45, r  # chance is 10 %
    assert r.to_dict()["mean"] == r.mean and "lenet [dc]" in str(r)


def test_float_labels_and_krr_protocol(data_root):
    x, y, x_te, y_te = _sets(data_root)
    soft = torch.nn.functional.one_hot(y, 10).float() - 0.1
    r = train_on_distilled(x, soft, x_te, y_te, protocol="krr", arch="mlp", repeats=1, steps=150, progress=False)
    assert r.mean > 45, r


def test_seeded_and_leaves_global_rng_alone(data_root):
    x, y, x_te, y_te = _sets(data_root, ipc=2)
    state = torch.get_rng_state()
    a = train_on_distilled(x, y, x_te, y_te, arch="mlp", repeats=2, steps=20, seed=5, progress=False)
    b = train_on_distilled(x, y, x_te, y_te, arch="mlp", repeats=2, steps=20, seed=5, progress=False)
    assert torch.equal(state, torch.get_rng_state())
    assert a.accuracies == b.accuracies
    assert a.accuracies[0] != a.accuracies[1]


def test_bad_arguments(data_root):
    x, y, x_te, y_te = _sets(data_root, ipc=1)
    with pytest.raises(ValueError, match="repeats"):
        train_on_distilled(x, y, x_te, y_te, repeats=0)
    with pytest.raises(ValueError, match="as many labels"):
        train_on_distilled(x, y[:3], x_te, y_te)
    with pytest.raises(ValueError, match="unknown"):
        train_on_distilled(x, y, x_te, y_te, arch="nope", steps=1, progress=False)


def test_dc_takes_the_argmax_class_of_float_labels(data_root):
    x, y, x_te, y_te = _sets(data_root, ipc=2)
    soft = torch.nn.functional.one_hot(y, 10).float() * 0.7 - 0.05
    a = train_on_distilled(x, soft, x_te, y_te, protocol="dc", arch="mlp", repeats=1, steps=10, progress=False)
    b = train_on_distilled(x, y, x_te, y_te, protocol="dc", arch="mlp", repeats=1, steps=10, progress=False)
    assert a.accuracies == b.accuracies
    assert a.extra["labels"] == "argmax class" and b.extra["labels"] == "as stored"
