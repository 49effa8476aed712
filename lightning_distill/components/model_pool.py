"""A pool of online networks held functionally (FRePo's model pool, reused by RCIG).

The networks are parameter/buffer dicts applied through ``torch.func.functional_call`` over one template module,
never registered ``nn.Module`` s, so Lightning does not move or checkpoint them behind the method's back and DDP
never wraps them (FRePo's meta-gradient would otherwise be all-reduced through them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_distill.functional.losses import half_mse

__all__ = ["ModelPool"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derive_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed: distinct (seed, index, reset) triples give unrelated streams."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h & ((1 << 63) - 1)


class _Member:
    """One pool network: parameters, buffers, Adam moments and counters (plain tensors and ints)."""

    __slots__ = ("adam_step", "buffers", "exp_avg", "exp_avg_sq", "params", "resets", "step")

    def __init__(self, params: dict[str, Tensor], buffers: dict[str, Tensor], step: int, resets: int) -> None:
        self.params = params
        self.buffers = buffers
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        self.adam_step = 0
        self.step = step
        self.resets = resets


class ModelPool:
    """Pool of online networks with staggered re-initialisation, as in FRePo.

    Each member is trained by one Adam step on the current synthetic set each time it is selected, and replaced by
    a freshly initialised network once its step count exceeds ``max_online_steps``. With ``staggered=True`` member
    ``i`` starts with a fake count ``floor(max_online_steps·i/size)``, so members reset at different times and the
    pool always mixes young and old feature extractors.

    Re-initialisation is seeded: member ``i`` after ``r`` resets is built by ``net_factory()`` under
    ``torch.random.fork_rng`` with a seed derived from ``(seed, i, r)``, so runs are reproducible and the global
    RNG is left untouched. The factory must build on the CPU (the pool moves the tensors to its device) and draw
    its randomness from the global CPU generator (``nn.init`` does).

    Args:
        net_factory: Returns a freshly (randomly) initialised network following the project's net contract:
            ``net(x)`` gives logits and ``net(x, features_only=True)`` gives flattened features.
        size: Number of networks.
        max_online_steps: A member is re-initialised when selected for training with a step count above this.
        lr: Constant Adam learning rate of the online updates.
        staggered: Start member ``i`` with the fake step count ``floor(max_online_steps·i/size)``.
        seed: Seed of all initialisations.
        betas: Adam moment decay rates.
        eps: Adam epsilon (optax/torch default 1e-8).
        device: Device of the pool tensors.
    """

    def __init__(
        self,
        net_factory: Callable[[], nn.Module],
        size: int = 10,
        max_online_steps: int = 100,
        lr: float = 3e-4,
        staggered: bool = True,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        device: torch.device | str = "cpu",
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if max_online_steps < 0:
            raise ValueError(f"max_online_steps must be >= 0, got {max_online_steps}")
        self.net_factory = net_factory
        self.size = size
        self.max_online_steps = max_online_steps
        self.lr = lr
        self.staggered = staggered
        self.seed = seed
        self.betas = betas
        self.eps = eps
        self._device = torch.device(device)
        # The template only supplies the forward code; its own tensors are never used, so it sits on the meta
        # device (no memory) and is built under a forked RNG so it consumes no global randomness.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_derive_seed(seed, -1, 0))
            self._template = net_factory().to("meta")
        self._members = [
            self._fresh_member(i, resets=0, step=self._initial_step(i) if staggered else 0) for i in range(size)
        ]

    # ------------------------------------------------------------------ construction helpers

    def _initial_step(self, idx: int) -> int:
        return (self.max_online_steps * idx) // self.size

    def _fresh_member(self, idx: int, resets: int, step: int) -> _Member:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_derive_seed(self.seed, idx, resets))
            net = self.net_factory()
        params = {k: v.detach().to(self._device).clone() for k, v in net.named_parameters()}
        buffers = {k: v.detach().to(self._device).clone() for k, v in net.named_buffers()}
        return _Member(params, buffers, step=step, resets=resets)

    def _check_idx(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise IndexError(f"pool index {idx} out of range for size {self.size}")

    # ------------------------------------------------------------------ selection and inspection

    @property
    def device(self) -> torch.device:
        """Device of the pool tensors."""
        return self._device

    @property
    def template(self) -> nn.Module:
        """The structure-only module (on the meta device) the members are applied through."""
        return self._template

    def __len__(self) -> int:
        return self.size

    def select(self, generator: torch.Generator) -> int:
        """Draw a member index uniformly.

        Args:
            generator: A CPU ``torch.Generator`` (the method's own, so selection is reproducible).

        Returns:
            The index.
        """
        return int(torch.randint(self.size, (1,), generator=generator).item())

    def step_count(self, idx: int) -> int:
        """Online step count of member ``idx`` (including the staggered offset before its first reset)."""
        self._check_idx(idx)
        return self._members[idx].step

    def reset_count(self, idx: int) -> int:
        """How many times member ``idx`` has been re-initialised."""
        self._check_idx(idx)
        return self._members[idx].resets

    def params(self, idx: int) -> dict[str, Tensor]:
        """The parameter dict of member ``idx`` (the stored tensors themselves; do not modify in place)."""
        self._check_idx(idx)
        return self._members[idx].params

    def buffers(self, idx: int) -> dict[str, Tensor]:
        """The buffer dict of member ``idx`` (the stored tensors themselves; do not modify in place)."""
        self._check_idx(idx)
        return self._members[idx].buffers

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: int,
        x: Tensor,
        features_only: bool = False,
        train: bool = False,
        params: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Apply member ``idx`` to ``x`` without touching its stored buffers.

        Args:
            idx: Member index.
            x: Input batch.
            features_only: Return flattened features instead of logits.
            train: Run normalisation layers in train mode (batch statistics). The running statistics are then
                updated on a copy only, so meta-gradient code never changes the pool.
            params: Parameters to use instead of the stored ones (e.g. tensors that require grad, for RCIG).

        Returns:
            Logits ``(B, C)`` or features ``(B, feature_dim)``. Differentiable w.r.t. ``x`` (and ``params``).
        """
        self._check_idx(idx)
        member = self._members[idx]
        buffers = {k: v.clone() for k, v in member.buffers.items()} if train else member.buffers
        tensors = {**(member.params if params is None else params), **buffers}
        self._template.train(train)
        kwargs = {"features_only": True} if features_only else {}
        return functional_call(self._template, tensors, (x,), kwargs)

    def features(self, idx: int, x: Tensor, train: bool = False) -> Tensor:
        """Flattened features of member ``idx`` (FRePo's φ_θ); BN uses running statistics unless ``train``.

        Args:
            idx: Member index.
            x: Input batch.
            train: Use batch statistics (the stored running statistics are still left untouched).

        Returns:
            Features ``(B, feature_dim)``, differentiable w.r.t. ``x``.
        """
        return self.forward(idx, x, features_only=True, train=train)

    # ------------------------------------------------------------------ online training

    def train_step(self, idx: int, x: Tensor, y_target: Tensor) -> Tensor | None:
        """One online update of member ``idx``, or its re-initialisation once it is old enough.

        If the member's step count exceeds ``max_online_steps`` it is replaced by a fresh network (seeded by
        ``(seed, idx, resets)``) with its step count and Adam state reset, and no training happens. Otherwise one
        Adam step on ``half_mse(net(x), y_target)`` is taken with normalisation layers in train mode (running
        statistics are updated) and the step count increases by one. Inputs are detached.

        Args:
            idx: Member index.
            x: Input batch (FRePo: up to 1000 synthetic images, no augmentation).
            y_target: Regression targets ``(B, C)`` (FRePo: the current learned labels).

        Returns:
            The detached loss before the update, or ``None`` if the call re-initialised the member.

        Note:
            Parameters and buffers are updated in place. Call this after the outer backward pass (FRePo's order):
            a graph built earlier from :meth:`features` of the same member would otherwise fail autograd's
            in-place check.
        """
        self._check_idx(idx)
        member = self._members[idx]
        if member.step > self.max_online_steps:
            self._members[idx] = self._fresh_member(idx, resets=member.resets + 1, step=0)
            return None

        x = x.detach()
        y_target = y_target.detach()
        names = list(member.params)
        # The method may call this under no_grad (e.g. in after_outer_step); the online loss needs its own graph.
        with torch.enable_grad():
            leaves = {k: member.params[k].detach().requires_grad_(True) for k in names}
            self._template.train(True)
            # Buffers are passed as the stored tensors, so BN updates the running statistics in place.
            out = functional_call(self._template, {**leaves, **member.buffers}, (x,))
            loss = half_mse(out, y_target.to(out.dtype))
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])

        beta1, beta2 = self.betas
        member.adam_step += 1
        bias1 = 1.0 - beta1**member.adam_step
        bias2_sqrt = math.sqrt(1.0 - beta2**member.adam_step)
        with torch.no_grad():
            for k, g in zip(names, grads, strict=True):
                m, v, p = member.exp_avg[k], member.exp_avg_sq[k], member.params[k]
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                # p ← p − lr · m̂ / (sqrt(v̂) + eps), written as in torch.optim.Adam.
                p.addcdiv_(m, v.sqrt().div_(bias2_sqrt).add_(self.eps), value=-self.lr / bias1)
        member.step += 1
        return loss.detach()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: plain tensors, ints and floats only (loads with ``torch.load(weights_only=True)``).

        Returns:
            A dict with the configuration needed to check compatibility and one entry per member.
        """
        members = [
            {
                "params": dict(m.params),
                "buffers": dict(m.buffers),
                "exp_avg": dict(m.exp_avg),
                "exp_avg_sq": dict(m.exp_avg_sq),
                "adam_step": m.adam_step,
                "step": m.step,
                "resets": m.resets,
            }
            for m in self._members
        ]
        return {"size": self.size, "max_online_steps": self.max_online_steps, "seed": self.seed, "members": members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (tensors are copied onto the pool's device).

        Args:
            state: The saved state.

        Raises:
            ValueError: If the pool size or the parameter/buffer names do not match.
        """
        if state["size"] != self.size:
            raise ValueError(f"state has {state['size']} members, pool has {self.size}")
        members = []
        for i, saved in enumerate(state["members"]):
            current = self._members[i]
            for key in ("params", "buffers"):
                if set(saved[key]) != set(getattr(current, key)):
                    raise ValueError(f"member {i}: {key} names differ from the pool's network")
            member = _Member(
                {k: v.detach().to(self._device).clone() for k, v in saved["params"].items()},
                {k: v.detach().to(self._device).clone() for k, v in saved["buffers"].items()},
                step=int(saved["step"]),
                resets=int(saved["resets"]),
            )
            member.exp_avg = {k: v.detach().to(self._device).clone() for k, v in saved["exp_avg"].items()}
            member.exp_avg_sq = {k: v.detach().to(self._device).clone() for k, v in saved["exp_avg_sq"].items()}
            member.adam_step = int(saved["adam_step"])
            members.append(member)
        # The seed continues the checkpointed run's re-initialisation stream; max_online_steps stays as
        # configured, so a resumed run may deliberately change it.
        self.seed = int(state["seed"])
        self._members = members

    def to(self, device: torch.device | str) -> ModelPool:
        """Move every member tensor to ``device`` (in place on the pool object).

        Args:
            device: Target device.

        Returns:
            The pool itself.
        """
        self._device = torch.device(device)
        for m in self._members:
            for d in (m.params, m.buffers, m.exp_avg, m.exp_avg_sq):
                for k in d:
                    d[k] = d[k].to(self._device)
        return self
