"""A pool of online networks held functionally (FRePo's model pool, reused by RCIG).

The networks are parameter/buffer dicts applied through ``torch.func.functional_call`` over one template module,
never registered ``nn.Module`` s, so Lightning does not move or checkpoint them behind the method's back and DDP
never wraps them (FRePo's meta-gradient would otherwise be all-reduced through them).

Each member's parameters are plain leaf tensors updated in place by its own ``torch.optim`` optimiser, so any
optimiser works and its state round-trips through the optimiser's own ``state_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_distill.functional.losses import half_mse
from lightning_distill.nets.seeded import seeded_net
from lightning_distill.precision import FP32, NetworkPrecision

__all__ = ["ModelPool", "OptimizerFactory"]

#: Builds a member's optimiser over its parameter tensors (in ``named_parameters`` order).
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

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


def _canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index, so it compares equal to the device tensors report (``cuda`` → ``cuda:0``)."""
    d = torch.device(device)
    if d.type == "cpu":
        return torch.device("cpu")  # CPU tensors report no index, so "cpu:0" must not count as another device
    if d.index is None:
        d = torch.empty(0, device=d).device
    return d


def _steps_range(steps_per_visit: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(steps_per_visit, int):
        low = high = steps_per_visit
    else:
        if len(steps_per_visit) != 2:
            raise ValueError(f"steps_per_visit must be an int or a (low, high) pair, got {steps_per_visit!r}")
        low, high = (int(s) for s in steps_per_visit)
    if not 1 <= low <= high:
        raise ValueError(f"steps_per_visit needs 1 <= low <= high, got {steps_per_visit!r}")
    return low, high


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move an optimiser's per-parameter state tensors to ``device``, as ``Optimizer.load_state_dict`` places them.

    torch keeps the scalar ``step`` on the CPU unless the optimiser is capturable or fused, so it stays put then.
    """
    for group in optimizer.param_groups:
        step_follows = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor) and (key != "step" or step_follows):
                    state[key] = value.to(device)


class _Member:
    """One pool network: parameters (leaf tensors), buffers, its optimiser and counters."""

    __slots__ = ("buffers", "optimizer", "params", "resets", "step")

    def __init__(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        optimizer: torch.optim.Optimizer,
        step: int,
        resets: int,
    ) -> None:
        self.params = params
        self.buffers = buffers
        self.optimizer = optimizer
        self.step = step
        self.resets = resets

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` in place: parameters keep their identity (the optimiser holds them)."""
        for p in self.params.values():
            if p.device != device:
                p.data = p.data.to(device)
        _move_optimizer_state(self.optimizer, device)
        for k, v in self.buffers.items():
            self.buffers[k] = v.to(device)


class ModelPool:
    """Pool of online networks with staggered re-initialisation, as in FRePo (and RCIG).

    Each time a member is selected for training it takes ``steps_per_visit`` optimiser steps on ``loss_fn`` of
    the current synthetic set (FRePo: one Adam step on ½-MSE; RCIG: 1–15 Adam steps drawn per visit), and it is
    replaced by a freshly initialised network once its step count exceeds ``max_online_steps``. With
    ``staggered=True`` member ``i`` starts with a fake count ``floor(max_online_steps·i/size)``, so members reset
    at different times and the pool always mixes young and old feature extractors.

    Re-initialisation is seeded: member ``i`` after ``r`` resets is built by
    :func:`~lightning_distill.nets.seeded_net` with a seed derived from ``(seed, i, r)``, so runs are reproducible
    and the global RNG is left untouched. The factory must build on the CPU (the pool moves the tensors to its
    device) and draw its randomness from the global CPU generator (``nn.init`` does).

    A large pool can be parked: with ``park_device="cpu"`` the members are stored on the CPU and copied to the
    compute device only while used, so only one member occupies accelerator memory at a time.

    Args:
        net_factory: Returns a freshly (randomly) initialised network following the project's net contract:
            ``net(x)`` gives logits and ``net(x, features_only=True)`` gives flattened features.
        size: Number of networks.
        max_online_steps: A member is re-initialised when selected for training with a step count above this.
        lr: Learning rate of the default Adam optimiser.
        staggered: Start member ``i`` with the fake step count ``floor(max_online_steps·i/size)``.
        seed: Seed of all initialisations.
        betas: Adam moment decay rates of the default optimiser.
        eps: Adam epsilon of the default optimiser (optax/torch default 1e-8).
        device: Compute device (and, unless parked, the device the members are stored on).
        optimizer_factory: Builds one member's optimiser from its parameter list; ``None`` gives
            ``torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)`` on the path ``fused`` chooses. It is called
            again for every re-initialised member, so hyper-parameters are the factory's, not saved state's.
        loss_fn: Online training loss ``loss_fn(logits, target) -> scalar`` (default ½-MSE). Floating targets
            are cast to the logits' dtype first.
        steps_per_visit: Optimiser steps per training visit: an int, or an inclusive ``(low, high)`` range
            drawn per visit from the generator passed to :meth:`train_step`.
        park_device: Where the members are stored between uses (e.g. ``"cpu"``); ``None`` stores them on the
            compute device.
        compile_features: Run the eval-mode feature pass (:meth:`features` without ``train``, FRePo's real-batch
            and support-set passes) through ``torch.compile`` (inductor, static shapes: one graph per batch size
            and grad mode, compiled on first use in seconds). Training passes and passes given ``params`` (RCIG's
            linearised ones) stay eager. Where the compiler fails (e.g. no C++ compiler on the machine) it warns
            once and runs eagerly. Measured in ``benchmarks/results/compile_trial_cpu.md``.
        precision: How network passes run (:class:`~lightning_distill.precision.NetworkPrecision`, resolved for
            the compute device): under bf16 :meth:`forward`, :meth:`features` and :meth:`train_step` run in bf16
            autocast on channels-last inputs, while parameters, gradients, optimiser state and the online loss stay
            float32 and outputs are returned in float32. ``None`` is float32 (the passes as without a policy).
        fused: The default Adam's kernel. ``True``: the fused kernel, which updates all of a member's tensors in
            one or two operator calls instead of about ten per tensor (the single-tensor path); a GPU step is
            bound by operator dispatch (``benchmarks/results/speed_methods_precision_h100.partial.md``), so it
            pays there. ``False``: the single-tensor path, the update of earlier versions' hand-written Adam bit
            for bit. ``None`` (default): fused where the pool computes on CUDA, single-tensor elsewhere; the
            choice follows :meth:`to`. Unused with an ``optimizer_factory``. Measured by
            ``benchmarks/pool_adam.py``.
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
        optimizer_factory: OptimizerFactory | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = half_mse,
        steps_per_visit: int | tuple[int, int] = 1,
        park_device: torch.device | str | None = None,
        precision: NetworkPrecision | None = None,
        compile_features: bool = False,
        fused: bool | None = None,
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
        self.betas = (float(betas[0]), float(betas[1]))  # torch.optim.Adam refuses int betas
        self.eps = eps
        self._fused = fused
        self._default_factory = optimizer_factory is None
        self.optimizer_factory: OptimizerFactory = optimizer_factory or self._default_optimizer
        self.loss_fn = loss_fn
        self.steps_per_visit = _steps_range(steps_per_visit)
        self.precision = precision or FP32
        self.compile_features = compile_features
        self._compiled_features: Callable[[dict[str, Tensor], Tensor], Tensor] | None = None
        self._device = _canonical_device(device)
        self._park_device = None if park_device is None else _canonical_device(park_device)
        # The template only supplies the forward code; its own tensors are never used, so it sits on the meta
        # device (no memory) and is built from its own seed so it consumes no global randomness.
        self._template = seeded_net(net_factory, _derive_seed(seed, -1, 0)).to("meta")
        self._members = [
            self._fresh_member(i, resets=0, step=self._initial_step(i) if staggered else 0) for i in range(size)
        ]

    # ------------------------------------------------------------------ construction helpers

    def _default_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        # Never torch's own choice (foreach on CUDA): the single-tensor path is the update the hand-written Adam
        # of earlier versions computed bit for bit, and where that does not matter (CUDA) fused is fewer calls.
        if self.uses_fused_adam:
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, fused=True)
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, foreach=False)

    @property
    def fused(self) -> bool | None:
        """The ``fused`` choice; setting it rebuilds the default optimisers on the kernel it names, state kept."""
        return self._fused

    @fused.setter
    def fused(self, value: bool | None) -> None:
        before = self.uses_fused_adam
        self._fused = value
        if self.uses_fused_adam != before:
            self._rebuild_default_optimizers()

    @property
    def uses_fused_adam(self) -> bool:
        """Whether the default optimiser runs Adam's fused kernel (``fused``, or by default: computing on CUDA)."""
        return self._fused if self._fused is not None else self._device.type == "cuda"

    def _initial_step(self, idx: int) -> int:
        return (self.max_online_steps * idx) // self.size

    @property
    def _store_device(self) -> torch.device:
        return self._device if self._park_device is None else self._park_device

    def _new_member(self, params: dict[str, Tensor], buffers: dict[str, Tensor], step: int, resets: int) -> _Member:
        optimizer = self.optimizer_factory(list(params.values()))
        return _Member(params, buffers, optimizer, step=step, resets=resets)

    def _fresh_member(self, idx: int, resets: int, step: int) -> _Member:
        net = seeded_net(self.net_factory, _derive_seed(self.seed, idx, resets))
        device = self._store_device
        # clone(): .to() returns the module's own tensor when the device already matches.
        params = {k: v.detach().to(device).clone() for k, v in net.named_parameters()}
        buffers = {k: v.detach().to(device).clone() for k, v in net.named_buffers()}
        return self._new_member(params, buffers, step=step, resets=resets)

    def _check_idx(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise IndexError(f"pool index {idx} out of range for size {self.size}")

    # ------------------------------------------------------------------ selection and inspection

    @property
    def device(self) -> torch.device:
        """Compute device: inputs, outputs and (unless parked) the stored tensors live here."""
        return self._device

    @property
    def park_device(self) -> torch.device | None:
        """Device the members are stored on between uses, or ``None`` when they stay on :attr:`device`."""
        return self._park_device

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

    def select_many(self, generator: torch.Generator, k: int) -> list[int]:
        """Draw ``k`` distinct member indices uniformly (without replacement).

        ``k == 1`` draws exactly as :meth:`select` does, so a method drawing one member at a time keeps the same
        sequence of members (and results) for a given seed.

        Args:
            generator: A CPU ``torch.Generator`` (the method's own, so selection is reproducible).
            k: How many members, ``1 <= k <= size``.

        Returns:
            The indices, in the order drawn.

        Raises:
            ValueError: If ``k`` is outside ``1..size``.
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"cannot draw {k} distinct members from a pool of {self.size}: use 1 to {self.size}")
        if k == 1:
            return [self.select(generator)]
        return torch.randperm(self.size, generator=generator)[:k].tolist()

    def step_count(self, idx: int) -> int:
        """Optimiser steps of member ``idx`` since its last reset (plus the staggered offset before the first)."""
        self._check_idx(idx)
        return self._members[idx].step

    def reset_count(self, idx: int) -> int:
        """How many times member ``idx`` has been re-initialised."""
        self._check_idx(idx)
        return self._members[idx].resets

    def params(self, idx: int) -> dict[str, Tensor]:
        """The parameter dict of member ``idx``: the stored leaf tensors its optimiser updates (do not modify)."""
        self._check_idx(idx)
        return self._members[idx].params

    def buffers(self, idx: int) -> dict[str, Tensor]:
        """The buffer dict of member ``idx`` (the stored tensors themselves; do not modify in place)."""
        self._check_idx(idx)
        return self._members[idx].buffers

    def optimizer(self, idx: int) -> torch.optim.Optimizer:
        """The optimiser of member ``idx`` (replaced by a fresh one when the member is re-initialised)."""
        self._check_idx(idx)
        return self._members[idx].optimizer

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
            x: Input batch (on :attr:`device`).
            features_only: Return flattened features instead of logits.
            train: Run normalisation layers in train mode (batch statistics). The running statistics are then
                updated on a copy only, so meta-gradient code never changes the pool.
            params: Parameters to use instead of the stored ones (e.g. tensors that require grad, for RCIG).

        Returns:
            Logits ``(B, C)`` or features ``(B, feature_dim)``. Differentiable w.r.t. ``x`` (and ``params``).
        """
        self._check_idx(idx)
        member = self._members[idx]
        parked = self._store_device != self._device
        if parked:
            # Temporary copies on the compute device: a graph built here keeps them, never the stored tensors,
            # so the member can stay parked (and be trained) while the graph lives.
            buffers = {k: v.to(self._device) for k, v in member.buffers.items()}
            stored = member.params if params is not None else {k: v.to(self._device) for k, v in member.params.items()}
        else:
            buffers = {k: v.clone() for k, v in member.buffers.items()} if train else member.buffers
            stored = member.params
        tensors = {**(stored if params is None else params), **buffers}
        self._template.train(train)
        if features_only and not train and params is None and self.compile_features:
            return self._features_compiled(tensors, x)
        kwargs = {"features_only": True} if features_only else {}
        return self._apply(tensors, x, kwargs)

    def _features_eager(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._apply(tensors, x, {"features_only": True})

    def _features_compiled(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        """The eval-mode feature pass through ``torch.compile``; eager (with one warning) where compiling fails."""
        if self._compiled_features is None:
            self._compiled_features = torch.compile(self._features_eager, dynamic=False)
        try:
            return self._compiled_features(tensors, x)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            warnings.warn(
                f"torch.compile could not compile the pool's feature pass ({str(err).splitlines()[0]}); running it "
                "eagerly. Install a C++ compiler (CPU) or set compile_features=False to silence this.",
                stacklevel=2,
            )
            self.compile_features = False
            return self._features_eager(tensors, x)

    def _apply(self, tensors: dict[str, Tensor], x: Tensor, kwargs: dict[str, Any] | None = None) -> Tensor:
        """One pass of the template under the pool's precision; float32 out (the identity pass under fp32)."""
        return self.precision.call(lambda x: functional_call(self._template, tensors, (x,), kwargs or {}), x)

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

    def _draw_steps(self, generator: torch.Generator | None) -> int:
        low, high = self.steps_per_visit
        if low == high:
            return low  # a fixed count consumes no randomness, so the caller's stream is as without a range
        if generator is None:
            raise ValueError(f"steps_per_visit={low, high} is drawn per visit: pass train_step a generator")
        return int(torch.randint(low, high + 1, (1,), generator=generator).item())

    def _update(self, member: _Member, x: Tensor, y_target: Tensor) -> Tensor:
        """One optimiser step of ``member`` on ``loss_fn(net(x), y_target)``; returns the loss before it."""
        params = list(member.params.values())
        # The method may call this under no_grad (e.g. in after_outer_step); the online loss needs its own graph.
        # The stored tensors require grad only for this step, so features() never builds a graph through them.
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            try:
                self._template.train(True)
                # Buffers are passed as the stored tensors, so BN updates the running statistics in place. Under
                # bf16 the logits come back in float32, so the loss and its reverse pass start in float32.
                out = self._apply({**member.params, **member.buffers}, x)
                target = y_target.to(out.dtype) if y_target.is_floating_point() else y_target
                loss = self.loss_fn(out, target)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                for p in params:
                    p.requires_grad_(False)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        member.optimizer.step()
        member.optimizer.zero_grad(set_to_none=True)
        member.step += 1
        return loss.detach()

    def train_step(
        self, idx: int, x: Tensor, y_target: Tensor, generator: torch.Generator | None = None
    ) -> Tensor | None:
        """One online visit of member ``idx``: ``steps_per_visit`` updates, or its re-initialisation when old.

        If the member's step count exceeds ``max_online_steps`` it is replaced by a fresh network (seeded by
        ``(seed, idx, resets)``) with its step count and optimiser state reset, and no training happens (nor is
        a step count drawn). Otherwise it takes the visit's optimiser steps on ``loss_fn(net(x), y_target)`` with
        normalisation layers in train mode (running statistics are updated), each adding one to the step count.
        Inputs are detached.

        Args:
            idx: Member index.
            x: Input batch (FRePo: up to 1000 synthetic images, no augmentation).
            y_target: Targets (FRePo: the current learned labels ``(B, C)``).
            generator: CPU generator the step count is drawn from when ``steps_per_visit`` is a range (unused,
                and may be ``None``, for a fixed count).

        Returns:
            The detached loss of the visit's last update (computed before it), or ``None`` if the call
            re-initialised the member.

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

        steps = self._draw_steps(generator)
        x = x.detach()
        y_target = y_target.detach()
        parked = self._store_device != self._device
        if parked:
            member.to(self._device)
        try:
            for _ in range(steps):
                loss = self._update(member, x, y_target)
        finally:
            if parked:
                member.to(self._store_device)
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state of plain containers and tensors (loads with ``torch.load(weights_only=True)``).

        Returns:
            A dict with the configuration needed to check compatibility and one entry per member: ``params``,
            ``buffers``, ``optimizer`` (the optimiser's own ``state_dict``), ``step`` and ``resets``.
        """
        members = [
            {
                "params": dict(m.params),
                "buffers": dict(m.buffers),
                "optimizer": m.optimizer.state_dict(),
                "step": m.step,
                "resets": m.resets,
            }
            for m in self._members
        ]
        return {"size": self.size, "max_online_steps": self.max_online_steps, "seed": self.seed, "members": members}

    @staticmethod
    def _legacy_adam_state(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
        """Adam state from a checkpoint of the earlier hand-written Adam (exp_avg, exp_avg_sq, adam_step)."""
        if int(saved["adam_step"]) == 0:
            return {}
        step = float(saved["adam_step"])
        return {
            i: {"step": torch.tensor(step), "exp_avg": saved["exp_avg"][k], "exp_avg_sq": saved["exp_avg_sq"][k]}
            for i, k in enumerate(names)
        }

    def _load_optimizer_state(self, i: int, member: _Member, saved: dict[str, Any]) -> None:
        optimizer = member.optimizer
        current = optimizer.state_dict()
        if "optimizer" in saved:
            groups = saved["optimizer"]["param_groups"]
            if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current["param_groups"]]:
                raise ValueError(f"member {i}: the saved optimiser has different parameter groups")
            state = saved["optimizer"]["state"]
        else:
            if not isinstance(optimizer, torch.optim.Adam):
                raise ValueError(f"member {i}: a checkpoint of the hand-written Adam needs an Adam optimiser")
            state = self._legacy_adam_state(saved, list(member.params))
        # Clone: Optimizer.load_state_dict keeps tensors already on the right device, which would alias the
        # caller's dict (and another pool loaded from it). Hyper-parameters stay as configured, like
        # max_online_steps, so a resumed run may deliberately change them; only per-parameter state is restored.
        state = {
            k: {name: v.clone() if isinstance(v, Tensor) else v for name, v in s.items()} for k, s in state.items()
        }
        optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (tensors are copied onto the pool's storage device).

        Checkpoints of earlier versions (hand-written Adam moments) load into the default Adam optimiser.

        Args:
            state: The saved state.

        Raises:
            ValueError: If the pool size, the parameter/buffer names or the optimiser layout do not match.
        """
        if state["size"] != self.size:
            raise ValueError(f"state has {state['size']} members, pool has {self.size}")
        device = self._store_device
        members = []
        for i, saved in enumerate(state["members"]):
            current = self._members[i]
            for key in ("params", "buffers"):
                if set(saved[key]) != set(getattr(current, key)):
                    raise ValueError(f"member {i}: {key} names differ from the pool's network")
            # The network's own name order, which is the order of the optimiser's parameter indices.
            member = self._new_member(
                {k: saved["params"][k].detach().to(device).clone() for k in current.params},
                {k: saved["buffers"][k].detach().to(device).clone() for k in current.buffers},
                step=int(saved["step"]),
                resets=int(saved["resets"]),
            )
            self._load_optimizer_state(i, member, saved)
            members.append(member)
        # The seed continues the checkpointed run's re-initialisation stream; max_online_steps stays as
        # configured, so a resumed run may deliberately change it.
        self.seed = int(state["seed"])
        self._members = members

    def to(self, device: torch.device | str) -> ModelPool:
        """Set the compute device; unparked members move there (in place on the pool object).

        Args:
            device: Target device.

        Returns:
            The pool itself.
        """
        fused_before = self.uses_fused_adam
        self._device = _canonical_device(device)
        for m in self._members:
            m.to(self._store_device)
        if self.uses_fused_adam != fused_before:
            self._rebuild_default_optimizers()
        return self

    def _rebuild_default_optimizers(self) -> None:
        """Rebuild the default Adam of every member on the kernel :attr:`uses_fused_adam` now names, state kept."""
        if not self._default_factory:
            return
        for i, m in enumerate(self._members):
            saved = {"optimizer": m.optimizer.state_dict()}
            m.optimizer = self.optimizer_factory(list(m.params.values()))
            self._load_optimizer_state(i, m, saved)
