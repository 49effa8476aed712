"""Membership inference: member chunks in the data, the attacks on known answers, the sweep, and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.data import MNISTDataModule
from lightning_distill.data.members import chunk_indices, complement
from lightning_distill.eval import get_protocol, make_augment, train_network
from lightning_distill.eval.privacy import (
    ATTACKS,
    Outputs,
    PrivacyError,
    PrivacyResult,
    accuracy,
    auc,
    balanced_split,
    heldout_indices,
    heldout_split_for,
    member_indices_of,
    member_split_for,
    network_outputs,
    privacy_sweep,
    run_attacks,
    sweep_protocol,
)
from lightning_distill.eval.privacy_command import format_privacy_table, privacy_figure
from lightning_distill.export import load_distilled, save_distilled
from lightning_distill.methods.base import describe_datamodule
from lightning_distill.nets import get_net, seeded_net
from tests.helpers import mnist_subset

REPO = Path(__file__).resolve().parents[1]


def _outputs(n: int, shift: float, seed: int, k: int = 10) -> Outputs:
    """Synthetic network outputs: logits around ``shift`` on the true class, losses falling as ``shift`` grows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += shift
    losses = torch.rand(n, generator=g) + 1.0 / (1.0 + shift)
    return Outputs(logits, losses, labels)


# ---------------------------------------------------------------------------------------------- member chunks


def test_chunk_indices_stored_order_and_seeded():
    assert torch.equal(chunk_indices(10, 1, 3), torch.tensor([3, 4, 5]))
    a, b = chunk_indices(100, 0, 30, seed=7), chunk_indices(100, 1, 30, seed=7)
    assert torch.equal(a, chunk_indices(100, 0, 30, seed=7)) and not torch.equal(a, chunk_indices(100, 0, 30, seed=8))
    assert len(set(a.tolist()) | set(b.tolist())) == 60 and torch.equal(a, a.sort().values)  # disjoint chunks, sorted
    assert torch.equal(complement(torch.tensor([0, 2]), 4), torch.tensor([1, 3]))
    for bad in ((10, 4, 3, None), (10, -1, 3, None), (10, 0, 0, None)):
        with pytest.raises(ValueError):
            chunk_indices(*bad)


def test_datamodule_serves_a_member_chunk(data_root):
    dm = MNISTDataModule(root=str(data_root), member_chunk=1, member_chunk_size=300, val_size=200)
    dm.setup()
    x_raw, y_raw = dm.load_split("train")
    assert torch.equal(dm.member_indices, torch.arange(300, 600)) and len(dm.x_train) == 300
    assert torch.equal(dm.y_train, y_raw[300:600])
    assert not set(dm.val_indices.tolist()) & set(dm.member_indices.tolist()) and len(dm.val_indices) == 200
    # The export's record of the data rebuilds exactly the images the DataModule trained on.
    info = describe_datamodule(dm)
    assert info["members"] == list(range(300, 600)) and info["datamodule"]["init_args"]["member_chunk"] == 1
    payload = {**info, "member_indices": torch.tensor(info["members"])}
    x_members, y_members = member_split_for(payload)
    assert torch.allclose(x_members, dm.x_train, atol=1e-6) and torch.equal(y_members, dm.y_train)
    # Held-out non-members: training images outside the chunk, seeded.
    out = heldout_indices(dm.member_indices, len(x_raw), 500, seed=1)
    assert len(out) == 500 and not set(out.tolist()) & set(dm.member_indices.tolist())
    assert torch.equal(out, heldout_indices(dm.member_indices, len(x_raw), 500, seed=1))
    assert not torch.equal(out, heldout_indices(dm.member_indices, len(x_raw), 500, seed=2))
    x_out, y_out = heldout_split_for(payload, 500, seed=1)
    assert torch.equal(y_out, y_raw[out]) and x_out.shape == (500, 1, 28, 28)
    # An export that lost the indices but kept the chunk spec gets the same members; one with neither is refused.
    assert torch.equal(member_indices_of({"datamodule": info["datamodule"]}, len(x_raw)), dm.member_indices)
    with pytest.raises(PrivacyError, match="records no member images"):
        member_indices_of({"datamodule": {"init_args": {}}}, len(x_raw))

    seeded = MNISTDataModule(root=str(data_root), member_chunk=0, member_chunk_size=300, member_seed=3)
    seeded.setup()
    assert torch.equal(seeded.member_indices, chunk_indices(len(x_raw), 0, 300, seed=3))
    # A chunk past the end of the training split (the fixture's 3000 images or the full 60000).
    too_far = len(MNISTDataModule(root=str(data_root)).load_split("train")[1]) // 300 + 1
    with pytest.raises(ValueError, match=f"chunk {too_far} of 300"):
        MNISTDataModule(root=str(data_root), member_chunk=too_far, member_chunk_size=300).setup()
    with pytest.raises(ValueError, match="member_chunk"):
        MNISTDataModule(root=str(data_root), member_chunk=-1)


def test_without_members_the_split_is_unchanged(data_root):
    dm = MNISTDataModule(root=str(data_root), val_size=300, seed=5)
    dm.setup()
    perm = torch.randperm(len(dm.load_split("train")[0]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(dm.val_indices, perm[:300].sort().values)
    assert torch.equal(dm.train_indices, perm[300:].sort().values)
    assert dm.member_indices is None and "members" not in describe_datamodule(dm)


# ---------------------------------------------------------------------------------------------- attacks


def test_balanced_split_is_disjoint_balanced_and_seeded():
    s = balanced_split(300, 1000, test_fraction=0.25, seed=1)
    assert len(s.train_members) == len(s.train_nonmembers) == 225
    assert len(s.test_members) == len(s.test_nonmembers) == 75
    assert not set(s.train_members.tolist()) & set(s.test_members.tolist())
    assert not set(s.train_nonmembers.tolist()) & set(s.test_nonmembers.tolist())
    assert int(s.test_nonmembers.max()) < 1000 and int(s.train_members.max()) < 300
    again, other = balanced_split(300, 1000, 0.25, seed=1), balanced_split(300, 1000, 0.25, seed=2)
    assert torch.equal(again.test_nonmembers, s.test_nonmembers)
    assert not torch.equal(other.test_nonmembers, s.test_nonmembers)
    for bad in ((1, 10, 0.5), (10, 10, 1.0), (10, 10, 0.0)):
        with pytest.raises(ValueError):
            balanced_split(*bad)


def test_auc_known_answers():
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0


def test_attacks_cannot_tell_identical_distributions_apart():
    # 1000 scored per side: an attack that knows nothing has AUC 0.5 ± 0.013 (sd); 0.07 is over five sd.
    aucs = run_attacks(_outputs(2000, 1.0, seed=0), _outputs(2000, 1.0, seed=1), num_classes=10, seed=0)
    assert list(aucs) == list(ATTACKS)
    assert all(abs(v - 0.5) < 0.07 for v in aucs.values()), aucs


def test_attacks_separate_members_that_stand_out():
    # Members with confident logits and low losses, as a network that memorised them gives.
    aucs = run_attacks(_outputs(1000, 6.0, seed=0), _outputs(1000, 0.0, seed=1), num_classes=10, seed=0)
    assert all(v > 0.95 for v in aucs.values()), aucs
    with pytest.raises(ValueError, match="unknown attack"):
        run_attacks(_outputs(10, 0, 0), _outputs(10, 0, 1), 10, attacks=["nope"])


def test_network_outputs_give_the_protocol_loss_per_image():
    net = seeded_net(lambda: get_net("mlp", 1, 10, 8), 0)
    x, y = torch.randn(7, 1, 8, 8), torch.randint(0, 10, (7,))
    krr = get_protocol("krr")
    out = network_outputs(net, x, y, krr, 10, batch_size=3)
    from lightning_distill.functional.losses import centred_one_hot

    with torch.no_grad():
        expected = 0.5 * (net(x) - centred_one_hot(y, 10)).pow(2).sum(1)
    assert torch.allclose(out.losses, expected, atol=1e-5) and out.logits.shape == (7, 10)
    ce = network_outputs(net, x, y, get_protocol("dc"), 10)
    with torch.no_grad():
        assert torch.allclose(ce.losses, torch.nn.functional.cross_entropy(net(x), y, reduction="none"), atol=1e-5)
    assert accuracy(out) == pytest.approx(100 * float((out.logits.argmax(1) == y).float().mean()))


# ---------------------------------------------------------------------------------------------- the sweep


def test_checkpoints_at_a_constant_rate_are_shorter_runs():
    # The sweep reads every step count off one run: at a constant rate step 3 of a 6-step run is the 3-step run.
    spec = sweep_protocol("krr")
    assert spec.schedule == "constant" and spec.lr == get_protocol("krr").lr
    assert sweep_protocol("krr", constant_lr=False) == get_protocol("krr")
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))

    def run(n_steps, keep):
        net = seeded_net(lambda: get_net("mlp", 1, 10, 8), 0)
        gen, aug = torch.Generator().manual_seed(0), make_augment(spec, flip=False)  # augmented, as the sweep trains
        return train_network(net, x, y, spec, n_steps, 10, gen, aug, checkpoint_steps=keep)

    (short,) = run(3, [3])
    three, _ = run(6, [3, 6])
    assert all(torch.equal(short[k], three[k]) for k in short)


def test_privacy_sweep_scores_every_step_count(data_root):
    x_tr, y_tr, x_te, y_te = mnist_subset(data_root, n_train=200, n_test=200)
    x_members, x_test = x_tr.float() / 255, x_te.float() / 255
    result = privacy_sweep(
        x_members[:20], y_tr[:20], x_members, y_tr, x_test, y_te, steps=[4, 2], flip=False,
        arch_kwargs={"width": 8}, attacks=["threshold", "logistic_regression"], name="distilled", progress=False,
    )  # fmt: skip
    assert [p.steps for p in result.points] == [2, 4] and result.protocol == "krr-constant-lr"
    assert all(set(p.auc) == {"threshold", "logistic_regression"} and 0 <= p.accuracy <= 100 for p in result.points)
    assert result.extra["protocol"]["schedule"] == "constant" and result.extra["arch_kwargs"]["width"] == 8
    again = PrivacyResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.points[1].best_auc == result.points[1].best_auc
    assert "| distilled | 4 |" in format_privacy_table([result])
    privacy_figure([result, again])  # draws without pyplot
    # Step 0 is the untrained network; given non-members replace the test split in the attacks only.
    untrained = privacy_sweep(
        x_members[:20], y_tr[:20], x_members, y_tr, x_test, y_te, steps=[0], flip=False, arch_kwargs={"width": 8},
        attacks=["threshold"], progress=False, nonmembers=(x_members[100:], y_tr[100:]),
    )  # fmt: skip
    assert untrained.points[0].steps == 0 and untrained.extra["nonmembers"] == "100 given images"
    privacy_figure([untrained])  # a step-0 point on the log axis
    with pytest.raises(ValueError, match="step counts >= 0"):
        privacy_sweep(x_members[:4], y_tr[:4], x_members, y_tr, x_test, y_te, steps=[-1])


# ---------------------------------------------------------------------------------------------- the command


def test_privacy_command_end_to_end(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = REPO / "recipes/random/mnist_ipc10_chunk_privacy.yaml"
    main(
        ["fit", "--config", str(recipe), f"--trainer.default_root_dir={out}", f"--data.init_args.root={data_root}",
         "--data.init_args.download=false", "--data.init_args.member_chunk_size=300", "--trainer.logger=false"]
    )  # fmt: skip
    path = out / "distilled.pt"
    payload = load_distilled(path)
    n_train = len(MNISTDataModule(root=str(data_root)).load_split("train")[0])
    assert torch.equal(payload["member_indices"], chunk_indices(n_train, 0, 300, seed=0))  # the recipe's seeded chunk
    assert payload["member_indices"].dtype == torch.int64
    capsys.readouterr()
    args = ["privacy", str(path), "--steps", "3", "--arch-kwargs", '{"width": 8}', "--no-progress"]
    results = main(args)
    printed = capsys.readouterr().out
    assert [r.name for r in results] == ["distilled", "real"] and [r.num_images for r in results] == [100, 300]
    assert "| distilled | 3 |" in printed and "| real | 3 |" in printed
    written = json.loads((out / "distilled_privacy.json").read_text())
    assert {"date", "hardware", "torch", "commit"} <= set(written["stamp"])
    assert [r["name"] for r in written["results"]] == ["distilled", "real"]
    points = [p for r in written["results"] for p in r["points"]]
    assert all(set(p["auc"]) == set(ATTACKS) and 0 <= p["best_auc"] <= 1 for p in points)
    assert written["results"][0]["extra"]["method"] == "RandomSubset"
    # The set is described as evaluate describes it, the precision it was distilled under included.
    precision = load_distilled(path)["config"]["precision_resolved"]
    assert written["results"][0]["extra"]["distilled_precision"] == precision
    assert (out / "distilled_privacy.png").stat().st_size > 1000
    # A second run keeps the first result: it goes to distilled_privacy-2.json (and -2.png) unless --overwrite.
    quick = ["--steps", "0", "--no-baseline", "--attacks", "threshold", "--no-progress"]
    main(["privacy", str(path), *quick])
    assert (out / "distilled_privacy-2.json").is_file() and (out / "distilled_privacy-2.png").is_file()
    assert len(json.loads((out / "distilled_privacy.json").read_text())["results"]) == 2

    # Held-out training images as the non-members; step 0 scores the untrained network (no training at all).
    (r,) = main(["privacy", str(path), *quick, "--nonmembers", "train", "--output", str(tmp_path / "train.json")])
    n_test = len(MNISTDataModule(root=str(data_root)).load_split("test")[1])  # as many as the test split holds
    assert r.extra["nonmembers"] == f"{n_test} training images outside the members" and r.points[0].steps == 0
    for bad, message in ((["--steps", "-1"], ">= 0"), (["--attacks", "nope"], "unknown nope"),
                         (["--protocol", "nope"], "unknown evaluation protocol")):  # fmt: skip
        with pytest.raises(SystemExit) as err:
            main(["privacy", str(path), *bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
    del payload["member_indices"], payload["datamodule"]["init_args"]["member_chunk"]
    save_distilled(payload, tmp_path / "no_members.pt")
    with pytest.raises(SystemExit) as err:
        main(["privacy", str(tmp_path / "no_members.pt"), "--steps", "1"])
    assert err.value.code == 2 and "records no member images" in capsys.readouterr().err
