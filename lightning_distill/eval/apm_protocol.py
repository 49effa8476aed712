"""APM's evaluation protocol: fresh ConvNets regress the stored teacher logits with an L1 loss.

Chen et al., "Dataset Distillation via Adversarial Prediction Matching" (2023), official code ``evaluate_synset_mc``:
ConvNet (width 128, instance norm), SGD with momentum 0.9 and weight decay 5e-4, batch 256, DSA on every batch,
``F.l1_loss`` (mean over images *and* classes) between the network's logits and the teacher logits stored as labels,
learning rate x0.1 at half the run, 1000 epochs (600 for the largest sets), 5 networks, test with top-1.

The learning rate is per dataset in APM's table (``lr_net``), so one protocol is registered per rate:

* ``apm``: 0.01 (the official argparse default; MNIST and Fashion-MNIST, which APM does not report);
* ``apm_lr0.02``: CIFAR-10, CIFAR-100 IPC 10;
* ``apm_lr0.04``: CIFAR-100 IPC 50/100;
* ``apm_lr0.1``: Tiny-ImageNet and ImageNet-1K (64 px; the ConvNet is then 4 blocks deep, chosen by resolution).

Pass ``--epochs 600`` where APM's table says 600. The schedule drops at half the optimiser steps (APM: after epoch
``E//2 + 1`` of ``E + 1``; the difference is under one epoch in a thousand). Class-id labels enter as centred one-hot
targets (recorded in the result), so random real images can be scored under the same protocol.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_distill.eval.protocols import PROTOCOLS, Protocol, register_loss, register_protocol

__all__ = ["APM_PROTOCOLS", "apm_student_protocol", "l1_mean"]


@register_loss("l1_mean", targets="float")
def l1_mean(out: Tensor, target: Tensor) -> Tensor:
    """APM's student and evaluation loss: ``F.l1_loss``, the absolute error averaged over images and classes.

    (The registered ``l1`` sums over classes; with SGD that is a C-times larger step, so APM's rates need this one.)
    """
    return F.l1_loss(out, target)


def _apm(name: str, lr: float) -> Protocol:
    return Protocol(
        name=name,
        arch="convnet",
        arch_kwargs={"width": 128, "norm": "instance"},
        optimizer="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        loss="l1_mean",
        schedule="step_half",
        epochs=1000,
        batch_size=256,
        augment="dsa",
    )


#: The registered APM protocols by name (learning rate per APM's table).
APM_PROTOCOLS: dict[str, Protocol] = {}
for _name, _lr in (("apm", 0.01), ("apm_lr0.02", 0.02), ("apm_lr0.04", 0.04), ("apm_lr0.1", 0.1)):
    # Importing this module twice (reload) must not fail on the registry's duplicate check.
    APM_PROTOCOLS[_name] = PROTOCOLS[_name] if _name in PROTOCOLS else register_protocol(_apm(_name, _lr))
del _name, _lr


def apm_student_protocol(
    arch: str, arch_kwargs: dict, lr: float, epochs: int, batch_size: int, augment: str = "dsa"
) -> Protocol:
    """The (unregistered) protocol of APM's students inside distillation: the evaluation's, with the run's settings.

    Args:
        arch: the students' network; ``arch_kwargs`` its options.
        lr: APM's ``lr_net``.
        epochs: epochs run (APM's ``s_epoch + 1``).
        batch_size: images per step (APM: 256, capped at the set size).
        augment: ``dsa`` (APM) or ``none``.
    """
    return Protocol(
        name="apm_student",
        arch=arch,
        arch_kwargs=dict(arch_kwargs),
        optimizer="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        loss="l1_mean",
        schedule="step_half",
        epochs=epochs,
        batch_size=batch_size,
        augment=augment,
    )
