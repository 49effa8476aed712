"""Class-aware real-batch streams: balanced counts, one pass per class, subsets, seeding and resumable state."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.data.stream import ClassBalancedStream, ClassSubsetStream, RealBatchStream
from tests.helpers import mnist_subset, tiny_mnist_dm


def _imbalanced(sizes: tuple[int, ...] = (5, 8, 3, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose single pixel is their index (so a batch names its images), labels in shuffled order."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1)
    return x, y


@pytest.fixture(scope="module")
def mnist(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = mnist_subset(data_root, n_train=600)
    return x.float() / 255, y


def test_balanced_counts_on_real_labels(mnist):
    x, y = mnist
    stream = ClassBalancedStream(x, y, batch_size=64, seed=0)
    shares = torch.zeros(10, dtype=torch.int64)
    for t in range(10):
        xb, yb = next(stream)
        counts = torch.bincount(yb, minlength=10)
        assert len(yb) == 64 and xb.shape == (64, 1, 28, 28)
        # 64 = 6·10 + 4: six of every class, the four extras on consecutive classes rotating by four per batch.
        extras = {(4 * t + j) % 10 for j in range(4)}
        assert counts.tolist() == [7 if c in extras else 6 for c in range(10)], t
        shares += counts
    assert shares.tolist() == [64] * 10  # over 10 batches (lcm rotation) every class got the same share


def test_balanced_sees_every_image_of_a_class_once_per_pass():
    sizes = (5, 8, 3, 11)
    x, y = _imbalanced(sizes)
    stream = ClassBalancedStream(x, y, batch_size=4, seed=1)  # one image per class per batch
    seen: dict[int, list[int]] = {c: [] for c in range(4)}
    for _ in range(3 * 11 * 8 * 5):  # several whole passes of every class
        xb, yb = next(stream)
        for image, label in zip(xb.flatten().long().tolist(), yb.tolist(), strict=True):
            assert y[image] == label
            seen[label].append(image)
    for c, n in enumerate(sizes):
        members = sorted(torch.nonzero(y == c).flatten().tolist())
        passes = [seen[c][i : i + n] for i in range(0, len(seen[c]) - n + 1, n)]
        assert passes and all(sorted(p) == members for p in passes), c
        assert len({tuple(p) for p in passes}) > 1  # a fresh permutation per pass


def test_balanced_options_and_errors():
    x, y = _imbalanced()
    grouped = ClassBalancedStream(x, y, batch_size=8, seed=0, shuffle=False).next_indices()
    assert y[grouped].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ClassBalancedStream(x, y, batch_size=3, seed=0).next_indices().numel() == 3  # fewer than classes
    with pytest.raises(ValueError, match="no training images"):
        ClassBalancedStream(x, y, batch_size=8, seed=0, num_classes=5)
    with pytest.raises(ValueError):
        ClassBalancedStream(x, y, batch_size=8, seed=0, num_classes=3)  # labels reach 3


def test_subset_fixed_classes(mnist):
    x, y = mnist
    stream = ClassSubsetStream(x, y, batch_size=30, seed=0, classes=[7, 2, 5])
    for _ in range(5):
        _, yb = next(stream)
        assert torch.bincount(yb, minlength=10).tolist() == [0, 0, 10, 0, 0, 10, 0, 10, 0, 0]
        assert stream.last_classes.tolist() == [7, 2, 5]
    for bad in ({"classes": []}, {"classes": [1, 1]}, {"classes": [10]}, {}, {"classes": [1], "classes_per_batch": 1}):
        with pytest.raises(ValueError):
            ClassSubsetStream(x, y, batch_size=30, seed=0, **bad)


def test_subset_random_classes_per_batch(mnist):
    x, y = mnist
    stream = ClassSubsetStream(x, y, batch_size=20, seed=0, classes_per_batch=4)
    chosen = []
    for _ in range(30):
        _, yb = next(stream)
        classes = stream.last_classes.tolist()
        assert len(set(classes)) == 4
        assert set(yb.tolist()) == set(classes)
        assert sorted(torch.bincount(yb, minlength=10)[classes].tolist()) == [5, 5, 5, 5]
        chosen.append(tuple(sorted(classes)))
    assert len(set(chosen)) > 10  # drawn afresh per batch
    assert set(sum(chosen, ())) == set(range(10))
    with pytest.raises(ValueError):
        ClassSubsetStream(x, y, batch_size=20, seed=0, classes_per_batch=11)


def test_per_class_batch(mnist):
    x, y = mnist
    stream = ClassSubsetStream(x, y, batch_size=20, seed=0, classes_per_batch=2)
    n3 = int((y == 3).sum())
    before = stream.state_dict()
    xb, yb = stream.per_class_batch(3, n3)
    assert (yb == 3).all() and xb.shape == (n3, 1, 28, 28)
    assert sorted(stream.per_class_indices(3, n3).tolist()) == sorted(torch.nonzero(y == 3).flatten().tolist())
    # The helper walks its own orders: the batch stream is where it was.
    after = stream.state_dict()
    assert torch.equal(before["generator"], after["generator"]) and before["pos"] == after["pos"]
    with pytest.raises(ValueError):
        stream.per_class_batch(10, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y, seed: ClassBalancedStream(x, y, batch_size=7, seed=seed),
        lambda x, y, seed: ClassSubsetStream(x, y, batch_size=7, seed=seed, classes=[0, 3]),
        lambda x, y, seed: ClassSubsetStream(x, y, batch_size=7, seed=seed, classes_per_batch=2),
    ],
    ids=["balanced", "fixed-subset", "random-subset"],
)
def test_seeded_and_state_round_trip(make, tmp_path):
    x, y = _imbalanced()
    a, b, c = make(x, y, 3), make(x, y, 3), make(x, y, 4)
    first = [a.next_indices() for _ in range(6)]
    assert all(torch.equal(i, j) for i, j in zip(first, [b.next_indices() for _ in range(6)], strict=True))
    assert not all(torch.equal(i, j) for i, j in zip(first, [c.next_indices() for _ in range(6)], strict=True))
    a.per_class_indices(0, 4)
    torch.save(a.state_dict(), tmp_path / "stream.pt")
    resumed = make(x, y, 99)
    resumed.load_state_dict(torch.load(tmp_path / "stream.pt", weights_only=True))
    for _ in range(15):
        assert torch.equal(a.next_indices(), resumed.next_indices())
        assert torch.equal(a.per_class_indices(1, 3), resumed.per_class_indices(1, 3))


def test_lookahead_state_is_before_the_prefetched_batch():
    x, y = _imbalanced()
    stream = ClassSubsetStream(x, y, batch_size=6, seed=0, lookahead=1, classes_per_batch=3)
    for _ in range(4):
        stream.next_indices()
    state = stream.state_dict()  # the 4th batch was only prefetched: a resumed run must draw it again
    fourth_again = ClassSubsetStream(x, y, batch_size=6, seed=5, lookahead=1, classes_per_batch=3)
    fourth_again.load_state_dict(state)
    replay = ClassSubsetStream(x, y, batch_size=6, seed=0, classes_per_batch=3)
    expected = [replay.next_indices() for _ in range(6)][3:]
    assert all(torch.equal(fourth_again.next_indices(), e) for e in expected)


def test_real_batch_stream_unchanged():
    # Pins RealBatchStream's numbers: the class-aware streams were added beside it without touching it.
    x, y = _imbalanced()
    stream = RealBatchStream(x, y, batch_size=10, seed=0)
    g = torch.Generator().manual_seed(0)
    perm1, perm2 = torch.randperm(len(x), generator=g), torch.randperm(len(x), generator=g)
    assert torch.equal(stream.next_indices(), perm1[:10])
    assert torch.equal(stream.next_indices(), perm1[10:20])
    assert torch.equal(stream.next_indices(), torch.cat([perm1[20:], perm2[: 30 - len(x)]]))


def test_datamodule_sampler_option_serves_balanced_batches(data_root):
    dm = tiny_mnist_dm(data_root, batch_size=40, sampler="balanced")
    dm.setup("fit")
    stream = dm.train_dataloader()
    assert isinstance(stream, ClassBalancedStream)
    for _ in range(3):
        _, y = next(stream)
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 4))
    with pytest.raises(ValueError, match="sampler must be"):
        tiny_mnist_dm(data_root, sampler="stratified")
