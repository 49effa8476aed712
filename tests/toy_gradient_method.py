"""A toy method written only against the public seams: it returns ready gradients, has a meta-parameter of its own
in its own group, and clips between the gradients and the optimiser step. It joins the contract suite unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.methods import DistillationMethod, MetaStep
from lightning_distill.synthetic import SyntheticSet


class ToyGradients(DistillationMethod):
    """Class-mean matching, ½‖mean_c(x_syn) / τ − mean_c(x_real) / τ‖² summed over classes, with gradients by hand.

    ``τ = exp(log_temperature)`` is a meta-parameter of the method with its own learning rate; the image gradient
    is written out in closed form (``MetaStep.grads``) instead of being back-propagated.
    """

    def __init__(self, synthetic: SyntheticSet, temperature_lr: float = 1e-2, clip: float = 1.0, seed: int = 0):
        super().__init__(synthetic=synthetic, seed=seed)
        self.temperature_lr, self.clip = temperature_lr, clip
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.clipped = 0

    def meta_parameter_groups(self) -> list[dict[str, Any]]:
        return super().meta_parameter_groups() + [
            {"name": "temperature", "params": [self.log_temperature], "lr": self.temperature_lr}
        ]

    def outer_loss(self, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor) -> MetaStep:
        ids = self.synthetic.class_ids().to(x_syn.device)
        k = self.synthetic.num_classes
        tau = self.log_temperature.detach().exp()
        # Tensors with grad (images or a factorised set's bases) get theirs by the chain rule through one backward
        # of the per-image gradient, computed by hand: d/dx_i = (m_syn_c - m_real_c) / (τ² · n_c).
        grad_x = torch.zeros_like(x_syn)
        loss = x_syn.new_zeros(())
        dtau = x_syn.new_zeros(())
        for c in range(k):
            real = x_real[y_real == c]
            if len(real) == 0:
                continue
            sel = ids == c
            diff = (x_syn[sel].detach().mean(0) - real.mean(0)) / tau
            loss = loss + 0.5 * diff.pow(2).sum()
            grad_x[sel] = diff / (tau * sel.sum())
            dtau = dtau - diff.pow(2).sum()  # d loss / d log τ
        outputs, grad_outputs = [x_syn], [grad_x]
        if y_syn.requires_grad:
            # Learned labels: ½‖y_syn − ½·onehot‖² / N pulls them halfway to their class, gradient (y − ½·onehot) / N.
            target = 0.5 * torch.nn.functional.one_hot(ids, k).to(y_syn)
            loss = loss + 0.5 * (y_syn.detach() - target).pow(2).sum() / len(y_syn)
            outputs.append(y_syn)
            grad_outputs.append((y_syn.detach() - target) / len(y_syn))
        params = dict(self.synthetic.named_parameters())
        tensors = [p for p in params.values() if p.requires_grad]
        image_grads = torch.autograd.grad(outputs, tensors, grad_outputs, allow_unused=True)
        grads = {f"synthetic.{n}": g for n, g in zip(params, image_grads, strict=True) if g is not None}
        grads["log_temperature"] = dtau
        return MetaStep(grads=grads, value=loss, logs={"train/temperature": tau})

    def before_meta_update(self, params: dict[str, nn.Parameter]) -> dict[str, float | Tensor]:
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), self.clip)
        self.clipped += int(norm > self.clip)
        return {"train/grad_norm_total": norm}
