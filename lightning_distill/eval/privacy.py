"""Membership inference: how much a network trained on a set leaks about which real images the set came from.

FRePo (Zhou, Nezhadarya, Ba, NeurIPS 2022) uses distilled data as a defence: distil from one chunk of the training
split (the members; the test split supplies the non-members), train fresh networks on the distilled set and, as the
baseline, on the real chunk itself, for an increasing number of steps, and after each run attacks on the network's
outputs that try to tell members from non-members. An attack's ROC AUC is 0.5 when it cannot, 1 when it always can.

This module is that evaluation, re-implemented from the description:

- pure functions over tensors: :func:`network_outputs` (logits, per-example losses, labels), :func:`balanced_split`
  (as many members as non-members, seeded, split into an attack-training and a scoring part), the loss-threshold
  attack (:func:`threshold_scores`) and the learned attacks of :data:`LEARNED_ATTACKS` (scikit-learn classifiers on
  logits, loss and one-hot label), :func:`auc`, and :func:`run_attacks` that runs them all;
- :func:`privacy_sweep`: one network trained under a named evaluation protocol, scored for accuracy and per-attack AUC
  at every step count of the sweep;
- :func:`evaluate_privacy`: both sweeps for an exported set (any method; it reads only the export format, whose
  ``member_indices`` name the members), and :func:`member_split_for`, which rebuilds the members from the raw data.

``lightning-distill privacy PATH`` (:mod:`lightning_distill.eval.privacy_command`) prints, writes and plots it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_distill.eval.distilled import datamodule_for, describe_export, test_split_for
from lightning_distill.eval.protocols import (
    NO_FLIP_DATASETS,
    Protocol,
    get_protocol,
    make_augment,
    make_loss,
    prepare_labels,
    training_set,
)
from lightning_distill.eval.train import train_network
from lightning_distill.export import load_distilled
from lightning_distill.nets import get_net, seeded_net

#: FRePo's step counts: each network is scored after this many optimiser steps.
FREPO_STEPS = (100, 250, 500, 1000, 2000, 4000, 8000, 16000)


class PrivacyError(ValueError):
    """An export or a request the privacy evaluation cannot serve (e.g. a set that records no members)."""


class Outputs(NamedTuple):
    """What an attacker sees of a network on some images: its logits, its loss on each image and the true labels."""

    logits: Tensor  #: (N, K) float
    losses: Tensor  #: (N,) float, the protocol's training loss on each image
    labels: Tensor  #: (N,) int64 class ids


@dataclass(frozen=True)
class AttackSplit:
    """Indices of members and non-members for training the attacks and for scoring them (disjoint, balanced)."""

    train_members: Tensor
    train_nonmembers: Tensor
    test_members: Tensor
    test_nonmembers: Tensor


# ------------------------------------------------------------------------------------------------ attacks (pure)


def balanced_split(n_members: int, n_nonmembers: int, test_fraction: float = 0.5, seed: int = 0) -> AttackSplit:
    """As many members as non-members (a seeded random subset of the larger side), each cut into train and test parts.

    Balance makes 0.5 the AUC of an attack that knows nothing, whichever side is larger (2000 members against a
    10000-image test split in FRePo's setting).

    Args:
        n_members: members available; ``n_nonmembers`` non-members available.
        test_fraction: share of each side kept for scoring; the rest trains the learned attacks.
        seed: seeds the subsets and the cut; the same seed gives the same split.

    Raises:
        ValueError: for fewer than 2 of either side or a fraction outside (0, 1).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = min(n_members, n_nonmembers)
    if n < 2:
        raise ValueError(f"need at least 2 members and 2 non-members, got {n_members} and {n_nonmembers}")
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    gen = torch.Generator().manual_seed(int(seed))
    members = torch.randperm(n_members, generator=gen)[:n]
    nonmembers = torch.randperm(n_nonmembers, generator=gen)[:n]
    return AttackSplit(members[n_test:], nonmembers[n_test:], members[:n_test], nonmembers[:n_test])


def attack_features(outputs: Outputs, num_classes: int) -> Tensor:
    """``(N, 2K + 1)`` float64 features of the learned attacks: the logits, the loss and the one-hot label."""
    one_hot = F.one_hot(outputs.labels.long(), num_classes).to(torch.float64)
    return torch.cat([outputs.logits.double(), outputs.losses.double()[:, None], one_hot], dim=1)


def threshold_scores(outputs: Outputs) -> Tensor:
    """The loss-threshold attack: a lower loss means "member", so the score is the negated loss."""
    return -outputs.losses.double()


def auc(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """ROC AUC of scores that should be higher for members (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(nonmember_scores))])
    scores = torch.cat([member_scores.double().cpu(), nonmember_scores.double().cpu()])
    return float(roc_auc_score(truth.numpy(), scores.numpy()))


def _logistic_regression(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def _mlp(seed: int) -> Any:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Early stopping on a tenth of its training part: an attack that memorises its own training part scores noise,
    # and on features that carry no signal it stops in a tenth of a second instead of running all its epochs.
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, early_stopping=True, random_state=seed)
    return make_pipeline(StandardScaler(), mlp)


def _random_forest(seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    # Leaves of several samples: fully grown trees memorise the attack's own training part and score noise.
    return RandomForestClassifier(n_estimators=100, min_samples_leaf=5, random_state=seed, n_jobs=1)


def _knn(seed: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Features on one scale, or the loss and the largest logits decide every distance.
    return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15))


#: Learned attacks by name: ``factory(seed)`` -> an unfitted scikit-learn classifier with ``predict_proba``. Add one
#: here and :func:`run_attacks` (and the command, ``--attacks``) can run it.
LEARNED_ATTACKS: dict[str, Callable[[int], Any]] = {
    "logistic_regression": _logistic_regression,
    "mlp": _mlp,
    "random_forest": _random_forest,
    "knn": _knn,
}
#: Every attack FRePo runs: the loss threshold, then the learned ones.
ATTACKS = ("threshold", *LEARNED_ATTACKS)


def learned_attack_auc(
    name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, seed: int = 0
) -> float:
    """Fit the learned attack ``name`` on ``(x_train, y_train)`` (1 = member) and return its AUC on the test part."""
    if name not in LEARNED_ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    clf = LEARNED_ATTACKS[name](seed)
    with warnings.catch_warnings():
        # An attack that has not converged is still an attack; its AUC says how good it got.
        warnings.filterwarnings("ignore", message=".*(converge|Maximum iterations).*")
        clf.fit(x_train.cpu().numpy(), y_train.cpu().numpy())
    scores = torch.from_numpy(clf.predict_proba(x_test.cpu().numpy())[:, 1])
    return auc(scores[y_test.cpu() == 1], scores[y_test.cpu() == 0])


def run_attacks(
    members: Outputs,
    nonmembers: Outputs,
    num_classes: int,
    attacks: Sequence[str] = ATTACKS,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """AUC of each attack at telling ``members`` from ``nonmembers`` on a held-out, balanced part of both.

    The learned attacks train on the rest; the threshold attack needs no training and is scored on the same part, so
    every AUC in the result comes from the same images.

    Args:
        members: the network's outputs on the images it (or the set it trained on) came from.
        nonmembers: its outputs on images it never saw (the test split).
        num_classes: label width of the one-hot feature.
        attacks: names from :data:`ATTACKS`.
        test_fraction: share of the balanced members and non-members used for scoring.
        seed: seeds the split and the attacks.

    Returns:
        ``{attack: AUC}`` in the order asked.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    split = balanced_split(len(members.losses), len(nonmembers.losses), test_fraction, seed)
    result: dict[str, float] = {}
    if "threshold" in attacks:
        member_scores, nonmember_scores = threshold_scores(members), threshold_scores(nonmembers)
        result["threshold"] = auc(member_scores[split.test_members], nonmember_scores[split.test_nonmembers])
    learned = [a for a in attacks if a != "threshold"]
    if learned:
        fm, fn = attack_features(members, num_classes), attack_features(nonmembers, num_classes)

        def part(m: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
            return torch.cat([fm[m], fn[n]]), torch.cat([torch.ones(len(m)), torch.zeros(len(n))]).long()

        x_train, y_train = part(split.train_members, split.train_nonmembers)
        x_test, y_test = part(split.test_members, split.test_nonmembers)
        for name in learned:
            result[name] = learned_attack_auc(name, x_train, y_train, x_test, y_test, seed)
    return {a: result[a] for a in attacks}


@torch.no_grad()
def network_outputs(
    net: nn.Module, images: Tensor, labels: Tensor, protocol: Protocol, num_classes: int, batch_size: int = 1000
) -> Outputs:
    """The network's logits on ``images``, its per-image training loss (the protocol's loss and label rule) and labels.

    The loss is what the network was trained to lower (½·sum of squares against centred one-hot targets under
    ``krr``, cross-entropy under ``dc``), so members it memorised show up as low losses.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    logits = torch.cat(
        [net(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )
    net.train(was_training)
    targets, _ = prepare_labels(labels.cpu(), protocol, num_classes)
    loss = make_loss(protocol)
    # Registered losses average over the batch: mapped over single rows they give one loss per image.
    losses = torch.vmap(lambda out, target: loss(out[None], target[None]))(logits, targets)
    return Outputs(logits, losses, labels.cpu().long())


def accuracy(outputs: Outputs) -> float:
    """Top-1 accuracy in % of the logits against the labels."""
    return float((outputs.logits.argmax(1) == outputs.labels).double().mean()) * 100


# ------------------------------------------------------------------------------------------------ the sweep


@dataclass
class StepScore:
    """One network state of a sweep: how far it trained, its test accuracy (%) and each attack's AUC."""

    steps: int
    accuracy: float
    auc: dict[str, float]

    @property
    def best_auc(self) -> float:
        """The strongest attack's AUC (what the defence has to hold down)."""
        return max(self.auc.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "best_auc": self.best_auc}


@dataclass
class PrivacyResult:
    """A sweep of one training set: accuracy and attack AUCs at each step count, with what produced them."""

    name: str
    protocol: str
    arch: str
    num_images: int
    num_members: int
    points: list[StepScore]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "arch": self.arch,
            "num_images": self.num_images,
            "num_members": self.num_members,
            "points": [p.to_dict() for p in self.points],
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyResult:
        """Rebuild a result from :meth:`to_dict` (a JSON file), e.g. to redraw its figure."""
        points = [StepScore(int(p["steps"]), float(p["accuracy"]), dict(p["auc"])) for p in d["points"]]
        fields = ("name", "protocol", "arch", "num_images", "num_members", "seconds")
        return cls(**{k: d[k] for k in fields}, points=points, extra=dict(d.get("extra", {})))


def sweep_protocol(protocol: str | Protocol, constant_lr: bool = True) -> Protocol:
    """The protocol a sweep trains under: ``protocol`` itself, or with a constant learning rate (the default).

    The sweep reads every step count off one run's checkpoints. Under a schedule set by the run's length (``krr``'s
    warm-up and cosine) the step-100 checkpoint of a 16000-step run is not a 100-step run; at a constant rate it is
    exactly that run (same seed, same batches), so one run replaces eight. FRePo's attack script trains its
    evaluation networks with Adam at a constant 3e-4.
    """
    spec = get_protocol(protocol)
    if not constant_lr or spec.schedule == "constant":
        return spec
    return replace(spec, name=f"{spec.name}-constant-lr", schedule="constant")


def privacy_sweep(
    images: Tensor,
    labels: Tensor,
    x_members: Tensor,
    y_members: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    protocol: str | Protocol = "krr",
    steps: Sequence[int] = FREPO_STEPS,
    num_classes: int | None = None,
    flip: bool = True,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    constant_lr: bool = True,
    attacks: Sequence[str] = ATTACKS,
    test_fraction: float = 0.5,
    seed: int = 0,
    device: str | torch.device | None = None,
    name: str = "",
    progress: bool = True,
    nonmembers: tuple[Tensor, Tensor] | None = None,
) -> PrivacyResult:
    """Train one fresh network on ``(images, labels)`` and score it at each step count of ``steps``.

    At each step count: accuracy on ``(x_test, y_test)`` and the AUC of every attack at telling the members
    ``(x_members, y_members)`` from the non-members (the test images unless ``nonmembers`` are given). For the real
    baseline ``images`` are the members themselves.

    Args:
        images: the training set ``(N, C, H, W)`` in model-input space; ``labels`` ``(N,)`` class ids or ``(N, K)``
            float targets, turned into the protocol's targets by its label rule.
        x_members: the real images the set came from, in the same space; ``y_members`` their class ids.
        x_test: the test split (accuracy, and the non-members); ``y_test`` its class ids.
        protocol: a registered protocol name (``krr``: FRePo's ConvNet without normalisation, Adam 3e-4, MSE) or a
            :class:`~lightning_distill.eval.Protocol`.
        steps: step counts to score at, read off the checkpoints of one run of ``max(steps)`` steps; 0 scores the
            untrained network, whose AUC is what the attacks get from differences between the member and
            non-member images alone (a floor, 0.5 when both come from one distribution).
        num_classes: defaults to the label width or the largest class id + 1.
        flip: allow horizontal flips in the augmentation (``False`` for digits).
        arch: network registry name; None takes the protocol's network (with its options).
        arch_kwargs: network options merged over the protocol's own (e.g. ``{"width": 32}`` on a CPU budget).
        constant_lr: train at the protocol's learning rate throughout (see :func:`sweep_protocol`); False keeps its
            schedule over ``max(steps)``, so earlier step counts are points along one longer run.
        attacks: names from :data:`ATTACKS`.
        test_fraction: share of the balanced members/non-members the attacks are scored on.
        seed: seeds the network, its data order and augmentation, and the attacks' split.
        device: where to train (default: CUDA when available).
        name: what the result is called in tables (``distilled``, ``real``).
        progress: show a progress bar.
        nonmembers: ``(x, y)`` images no network here trained on, in the same space; None: the test split (FRePo's
            choice). Held-out training images avoid the shift between a dataset's training and test images.
    """
    spec = sweep_protocol(protocol, constant_lr)
    keep = sorted({int(s) for s in steps})
    if not keep or keep[0] < 0:
        raise ValueError(f"steps must be step counts >= 0, got {list(steps)}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images and at least one image, got {len(images)} and {len(labels)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if num_classes is None:
        num_classes = int(labels.shape[1]) if labels.ndim == 2 else int(max(labels.max(), y_test.max())) + 1
    arch_name = arch or spec.arch
    kwargs = {**(spec.arch_kwargs if arch is None or arch == spec.arch else {}), **(arch_kwargs or {})}
    targets, label_use = prepare_labels(labels, spec, num_classes)
    x_train, targets = training_set(images.to(device, torch.float32), targets.to(device), spec, flip)
    augment = make_augment(spec, flip).to(device)
    build = partial(get_net, arch_name, x_train.shape[1], num_classes, x_train.shape[-1], **kwargs)
    net = seeded_net(build, seed).to(device)

    start = time.perf_counter()
    with tqdm(total=keep[-1], desc=f"privacy {name or 'set'} [{spec.name}]", disable=not progress, leave=False) as bar:
        states = train_network(
            net,
            x_train,
            targets,
            spec,
            keep[-1],
            num_classes,
            torch.Generator().manual_seed(seed),
            augment,
            checkpoint_steps=keep,
            bar=bar,
        )
    train_seconds = time.perf_counter() - start
    points = []
    for n_steps, state in zip(keep, states, strict=True):
        net.load_state_dict(state)
        test_out = network_outputs(net, x_test, y_test, spec, num_classes)
        member_out = network_outputs(net, x_members, y_members, spec, num_classes)
        other_out = test_out if nonmembers is None else network_outputs(net, *nonmembers, spec, num_classes)
        aucs = run_attacks(member_out, other_out, num_classes, attacks, test_fraction, seed)
        points.append(StepScore(n_steps, accuracy(test_out), aucs))
    extra = {
        "arch_kwargs": kwargs,
        "labels": label_use,
        "protocol": spec.to_dict(),
        "train_images": len(x_train),
        "train_seconds": train_seconds,
        "test_images": len(x_test),
        "nonmembers": "test split" if nonmembers is None else f"{len(nonmembers[0])} given images",
        "test_fraction": test_fraction,
        "seed": seed,
        "device": str(device),
    }
    return PrivacyResult(
        name, spec.name, arch_name, len(images), len(x_members), points, time.perf_counter() - start, extra
    )


# ------------------------------------------------------------------------------------------------ exports


def member_indices_of(payload: dict[str, Any], n_train: int) -> Tensor:
    """The members of an export as indices into the raw training split of ``n_train`` images.

    Read from ``member_indices``; an export without them that records a DataModule ``member_chunk`` gets the chunk
    recomputed from that spec.

    Raises:
        PrivacyError: the export names no members (it was distilled from the whole training split).
    """
    if payload.get("member_indices") is not None:
        idx = torch.as_tensor(payload["member_indices"], dtype=torch.int64)
    else:
        from lightning_distill.data.members import chunk_indices

        args = (payload.get("datamodule") or {}).get("init_args") or {}
        if args.get("member_chunk") is None:
            raise PrivacyError(
                "this set records no member images: distil it from a chunk of the training split "
                "(--data.init_args.member_chunk=0, e.g. recipes/frepo/mnist_ipc10_chunk_cpu_privacy.yaml) so a "
                "privacy evaluation knows which real images are the members"
            )
        idx = chunk_indices(
            n_train, int(args["member_chunk"]), int(args.get("member_chunk_size", 2000)), args.get("member_seed")
        )
    if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_train:
        raise PrivacyError(f"the recorded member indices do not fit a training split of {n_train} images")
    return idx


def _train_split(payload: dict[str, Any], root: str | None, path: str | None) -> tuple[Tensor, Tensor, Any]:
    """The raw training split of the export's dataset and the export's preprocessing."""
    from lightning_distill.data.preprocess import Preprocessing

    x_raw, y_raw = datamodule_for(payload, root, path).load_split("train")
    return x_raw, y_raw, Preprocessing.from_dict(payload["preprocessing"])


def member_split_for(
    payload: dict[str, Any], root: str | None = None, path: str | None = None
) -> tuple[Tensor, Tensor]:
    """The export's member images (the real chunk it was distilled from) in its model-input space, and their labels.

    Args:
        payload: a loaded export.
        root: overrides the recorded data root; ``path`` the recorded file or folder (array and ImageFolder data).
    """
    x_raw, y_raw, prep = _train_split(payload, root, path)
    idx = member_indices_of(payload, len(x_raw))
    return prep.apply(x_raw[idx].float() / 255.0), y_raw[idx].clone()


def heldout_indices(members: Tensor, n_images: int, size: int, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded random ``size`` of the ``n_images`` outside ``members`` (all of them if fewer)."""
    from lightning_distill.data.members import complement

    rest = complement(members, n_images)
    return rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(int(seed)))[:size]].sort().values


def heldout_split_for(
    payload: dict[str, Any], size: int, seed: int = 0, root: str | None = None, path: str | None = None
) -> tuple[Tensor, Tensor]:
    """A seeded random ``size`` of the training images outside the export's members, in its model-input space.

    Non-members from the members' own distribution: an attack that learns nothing scores 0.5 against them, where the
    test split can differ from the training split enough to be told apart by an untrained network.
    """
    x_raw, y_raw, prep = _train_split(payload, root, path)
    pick = heldout_indices(member_indices_of(payload, len(x_raw)), len(x_raw), size, seed)
    if len(pick) < 2:
        raise PrivacyError(f"the training split holds {len(pick)} images outside the members: no non-members left")
    return prep.apply(x_raw[pick].float() / 255.0), y_raw[pick].clone()


def evaluate_privacy(
    path: str | os.PathLike,
    protocol: str | Protocol = "krr",
    steps: Sequence[int] = FREPO_STEPS,
    baseline: bool = True,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    constant_lr: bool = True,
    attacks: Sequence[str] = ATTACKS,
    test_fraction: float = 0.5,
    seed: int = 0,
    root: str | None = None,
    data_path: str | None = None,
    device: str | None = None,
    progress: bool = True,
    nonmembers: str = "test",
) -> list[PrivacyResult]:
    """Score the set in ``path`` for privacy beside accuracy, and (``baseline``) its real member chunk the same way.

    Any method's export works: the members come from its ``member_indices`` (or its DataModule's chunk spec), the
    non-members and the accuracy from its dataset's test split, both in the preprocessing the export records.

    Args:
        path: the export (``distilled.pt``).
        baseline: also train on the real members themselves (FRePo's comparison).
        seed, protocol, steps, arch, arch_kwargs, constant_lr, attacks, test_fraction, device, progress: as in
            :func:`privacy_sweep` (the same for both sweeps).
        root: data root (default: the recorded one); ``data_path`` the file or folder of array/ImageFolder data.
        nonmembers: ``test`` (the test split, FRePo's choice) or ``train`` (as many training images outside the
            members as the test split holds, seeded: the members' own distribution, see :func:`heldout_split_for`).

    Returns:
        ``[distilled]`` or ``[distilled, real]``.
    """
    if nonmembers not in ("test", "train"):
        raise ValueError(f"nonmembers must be 'test' or 'train', got {nonmembers!r}")
    payload = load_distilled(path)
    x_members, y_members = member_split_for(payload, root=root, path=data_path)
    x_test, y_test = test_split_for(payload, root=root, path=data_path)
    pool = None if nonmembers == "test" else heldout_split_for(payload, len(x_test), seed, root, data_path)
    common: dict[str, Any] = dict(
        protocol=protocol,
        steps=steps,
        num_classes=int(payload["num_classes"]),
        flip=payload["dataset"] not in NO_FLIP_DATASETS,
        arch=arch,
        arch_kwargs=arch_kwargs,
        constant_lr=constant_lr,
        attacks=attacks,
        test_fraction=test_fraction,
        seed=seed,
        device=device,
        progress=progress,
        nonmembers=pool,
    )
    info = {
        **describe_export(path, payload),
        "nonmembers": "test split" if pool is None else f"{len(pool[0])} training images outside the members",
    }
    sets = [("distilled", payload["images"], payload["labels"])]
    if baseline:
        sets.append(("real", x_members, y_members))
    results = []
    for name, images, labels in sets:
        result = privacy_sweep(images, labels, x_members, y_members, x_test, y_test, name=name, **common)
        result.extra.update(info)
        results.append(result)
    return results
