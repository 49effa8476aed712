"""Open evaluation protocols: registries of parts, protocols registered from outside the package, one training loop."""

import json

import pytest
import torch
from torch import Tensor

from lightning_distill.eval import (
    PROTOCOLS,
    Protocol,
    get_protocol,
    make_augment,
    make_loss,
    make_schedule,
    prepare_labels,
    register_augment,
    register_loss,
    register_optimizer,
    register_protocol,
    register_schedule,
    train_network,
    train_on_distilled,
    training_set,
)
from lightning_distill.nets import get_net, seeded_net

# What a method's own file does: register a part and a protocol at import time, outside the package.
BATCH_SIZES: list[int] = []


@register_loss("test_counting_l1", targets="float")
def _counting_l1(out: Tensor, target: Tensor) -> Tensor:
    BATCH_SIZES.append(len(out))
    return (out - target).abs().sum(1).mean()


OUTSIDE = register_protocol(
    Protocol(
        name="test_outside",
        arch="mlp",
        arch_kwargs={"width": 16},
        loss="l1",
        schedule="constant",
        augment="none",
        epochs=2,
        batch_size=4,
    )
)


def _data(n: int = 10, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, x_te = torch.randn(n, 1, 28, 28, generator=g), torch.randn(30, 1, 28, 28, generator=g)
    return x, torch.arange(n) % 5, x_te, torch.randint(0, 5, (30,), generator=g)


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].cpu()) for k in a)


def test_builtin_protocols_are_registered_as_before():
    dc, krr = get_protocol("dc"), get_protocol("krr")
    assert PROTOCOLS["dc"] is dc and dc == Protocol(
        name="dc", arch="convnet", arch_kwargs={"width": 128, "norm": "instance"}
    )
    assert (krr.optimizer, krr.lr, krr.loss, krr.schedule, krr.augment, krr.epochs, krr.batch_size, krr.shuffle) == (
        "adam",
        3e-4,
        "mse",
        "warmup_cosine",
        "krr",
        None,
        500,
        False,
    )
    assert dc.labels == krr.labels == "as_stored" and not dc.flip_support and not krr.flip_support


def test_protocol_registered_outside_the_package_trains_and_is_recorded():
    x, y, x_te, y_te = _data()
    r = train_on_distilled(x, y, x_te, y_te, protocol="test_outside", repeats=2, device="cpu", progress=False)
    assert r.protocol == "test_outside" and r.arch == "mlp" and r.steps == 2 * 3  # 2 epochs of ceil(10 / 4) batches
    assert len(r.accuracies) == 2 and r.extra["arch_kwargs"] == {"width": 16}
    assert r.extra["protocol"] == OUTSIDE.to_dict() and r.extra["labels"] == "as stored"
    assert Protocol(**json.loads(json.dumps(r.extra["protocol"]))) == OUTSIDE  # plain data, rebuilds the protocol


def test_duplicate_names_raise():
    with pytest.raises(ValueError, match="already registered"):
        register_protocol(Protocol(name="test_outside", arch="lenet"))
    assert PROTOCOLS["test_outside"] is OUTSIDE
    assert register_protocol(OUTSIDE, overwrite=True) is OUTSIDE
    for register, name in ((register_optimizer, "sgd"), (register_schedule, "constant"), (register_augment, "dsa")):
        with pytest.raises(ValueError, match=f"named '{name}' is already registered"):
            register(name)(lambda *a: None)
    with pytest.raises(ValueError, match="named 'l1' is already registered"):
        register_loss("l1", targets="float")(lambda out, target: out.sum())
    with pytest.raises(ValueError, match="'class' or 'float'"):
        register_loss("test_bad_kind", targets="soft")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "known"),
    [
        ("loss", "ce, l1, mse"),
        ("optimizer", "adam, sgd"),
        ("schedule", "constant, step_half, warmup_cosine"),
        ("augment", "dsa, krr, none"),
        ("labels", "argmax, as_stored"),
    ],
)
def test_unknown_part_names_raise_listing_the_known_ones(field, known):
    with pytest.raises(ValueError, match="protocol 'x': unknown .*'nope'; known: ") as err:
        register_protocol(Protocol(name="x", arch="mlp", **{field: "nope"}))
    assert all(name in str(err.value) for name in known.split(", ")), err.value
    assert "x" not in PROTOCOLS
    with pytest.raises(ValueError, match="choose one of .*dc, krr"):
        get_protocol("nope")


def test_l1_loss_is_the_batch_mean_of_summed_absolute_errors():
    out, target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    loss = make_loss(OUTSIDE)
    hand = ((1 + 2 + 0.5) + (1 + 2 + 2)) / 2
    assert loss.targets == "float" and loss(out, target).item() == pytest.approx(hand)
    mse = make_loss(get_protocol("krr"))
    assert mse(out, target).item() == pytest.approx(0.5 * ((1 + 4 + 0.25) + (1 + 4 + 4)) / 2)


def test_constant_schedule_keeps_the_learning_rate():
    f = make_schedule(OUTSIDE, 300)
    assert {f(t) for t in range(0, 300, 7)} == {1.0}


def test_no_augmentation_is_the_identity_and_draws_nothing():
    x, g = torch.randn(3, 1, 28, 28), torch.Generator().manual_seed(0)
    state = g.get_state()
    assert make_augment(OUTSIDE, flip=True)(x, generator=g) is x and torch.equal(g.get_state(), state)


def test_train_network_returns_checkpoints_at_the_requested_steps():
    x, y, _, _ = _data()

    def fresh() -> torch.nn.Module:
        return seeded_net(lambda: get_net("mlp", 1, 5, 28, width=16), 3)

    net, initial = fresh(), fresh().state_dict()
    aug = make_augment(OUTSIDE, flip=True)
    ckpts = train_network(
        net, x, y, OUTSIDE, 6, 5, torch.Generator().manual_seed(1), aug, checkpoint_steps=(3, 0, 6, 3)
    )
    assert len(ckpts) == 3 and all(v.device.type == "cpu" and not v.requires_grad for c in ckpts for v in c.values())
    assert _same_state(ckpts[0], initial) and _same_state(ckpts[2], net.state_dict())
    assert not _same_state(ckpts[1], initial) and not _same_state(ckpts[1], ckpts[2])
    # Under a constant learning rate the first 3 steps of a 6-step run are a 3-step run: the middle checkpoint is it.
    short = fresh()
    train_network(short, x, y, OUTSIDE, 3, 5, torch.Generator().manual_seed(1), aug)
    assert _same_state(ckpts[1], short.state_dict())
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        train_network(fresh(), x, y, OUTSIDE, 6, 5, torch.Generator(), aug, checkpoint_steps=(7,))


def test_flip_support_trains_on_the_set_and_its_flips():
    x, y, x_te, y_te = _data(n=6)
    doubled = Protocol(
        name="test_flip",
        arch="mlp",
        arch_kwargs={"width": 8},
        loss="test_counting_l1",
        augment="none",
        batch_size=100,
        flip_support=True,
    )
    xs, ys = training_set(x, y, doubled, flip=True)
    assert torch.equal(xs, torch.cat([x, x.flip(-1)])) and torch.equal(ys, torch.cat([y, y]))
    assert training_set(x, y, doubled, flip=False)[0] is x  # digits: no flipped copies
    BATCH_SIZES.clear()
    r = train_on_distilled(x, y, x_te, y_te, protocol=doubled, repeats=1, steps=2, device="cpu", progress=False)
    assert BATCH_SIZES == [12, 12] and r.num_images == 6 and r.extra["train_images"] == 12
    BATCH_SIZES.clear()
    r = train_on_distilled(
        x, y, x_te, y_te, protocol=doubled, repeats=1, steps=2, flip=False, device="cpu", progress=False
    )
    assert BATCH_SIZES == [6, 6] and r.extra["train_images"] == 6


def test_label_rules_are_recorded_and_idempotent():
    x, y, x_te, y_te = _data()
    soft = torch.nn.functional.one_hot(y, 5).float() * 0.8 - 0.1
    ce = Protocol(name="test_ce", arch="mlp", arch_kwargs={"width": 8}, augment="none", batch_size=4)
    kw = dict(repeats=1, steps=4, device="cpu", progress=False)
    a, b = (
        train_on_distilled(x, soft, x_te, y_te, protocol=ce, **kw),
        train_on_distilled(x, y, x_te, y_te, protocol=ce, **kw),
    )
    assert a.extra["labels"] == "argmax class" and b.extra["labels"] == "as stored" and a.accuracies == b.accuracies
    hard_l1 = Protocol(name="test_hard", arch="mlp", loss="l1", labels="argmax")
    targets, note = prepare_labels(soft, hard_l1, 5)
    assert note == "argmax class" and torch.equal(targets, prepare_labels(y, get_protocol("krr"), 5)[0])
    for protocol in (ce, hard_l1, get_protocol("krr")):
        for labels in (y, soft):
            once = prepare_labels(labels, protocol, 5)[0]
            assert torch.equal(prepare_labels(once, protocol, 5)[0], once)


def test_protocol_registered_outside_is_usable_by_evaluate_and_the_callbacks(data_root, tmp_path, capsys):
    """The command and CrossArchitectureEval accept a protocol that only this test file registered."""
    from lightning_distill.callbacks import CrossArchitectureEval
    from lightning_distill.cli import main

    out = tmp_path / "run"
    callback = (
        '--trainer.callbacks+={"class_path": "lightning_distill.callbacks.CrossArchitectureEval", "init_args": '
        '{"archs": ["mlp"], "protocol": "test_outside", "repeats": 1, "steps": 2, "progress": false}}'
    )
    cli = main(
        [
            "fit",
            "--config",
            "recipes/random/mnist_ipc1.yaml",
            f"--trainer.default_root_dir={out}",
            f"--data.init_args.root={data_root}",
            "--data.init_args.download=false",
            "--trainer.logger=false",
            callback,
        ]
    )
    evals = [cb for cb in cli.trainer.callbacks if isinstance(cb, CrossArchitectureEval)]
    assert evals and evals[0].history and evals[0].history[-1]["protocol"] == "test_outside"
    capsys.readouterr()
    main(
        [
            "evaluate",
            str(out / "distilled.pt"),
            "--protocol",
            "test_outside",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--no-progress",
        ]
    )
    assert "| mlp | test_outside |" in capsys.readouterr().out
    (written_path,) = out.glob("distilled_eval_test_outside*.json")
    written = json.loads(written_path.read_text())
    assert written["results"][0]["extra"]["protocol"]["loss"] == "l1"
