"""The maths of adversarial prediction matching (APM): the teacher–student discrepancy and its chunked gradient.

Chen et al., "Dataset Distillation via Adversarial Prediction Matching" (2023). The synthetic images are moved to
**maximise** the summed L1 discrepancy between a teacher's logits and those of K student checkpoints, while a weighted
teacher cross-entropy keeps them on their class. The quantity minimised with respect to the images is

    L(x) = - sum_k mean_{i,c} |f_k(x_i)_c - f_T(x_i)_c|  +  ce_weight * CE(f_T(x), y)

(the log of the paper's Eq. 3 is dropped, as the authors' code does). Flipping the sign of the first term would turn
the method into knowledge distillation on synthetic data, a different and weaker method.

Pure functions: no Lightning, no global random state. Networks enter as callables or as a template module plus
state dicts (evaluated with ``torch.func.functional_call``), so the same code runs with the students stacked under
``vmap`` or one after another.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = [
    "apm_gradients",
    "apm_loss",
    "checkpoint_epochs",
    "l1_discrepancy",
    "looped_logits",
    "stack_checkpoints",
    "stacked_logits",
]


def l1_discrepancy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Summed over the K checkpoints, the L1 distance to the teacher averaged over images and classes.

    Args:
        student_logits: ``(K, B, C)`` logits of the K student checkpoints.
        teacher_logits: ``(B, C)`` logits of the teacher.

    Returns:
        A scalar, ``sum_k mean_{i,c} |s_kic - t_ic|`` (the official code's ``F.l1_loss`` per checkpoint, summed).
    """
    if student_logits.ndim != 3 or student_logits.shape[1:] != teacher_logits.shape:
        raise ValueError(
            f"student logits must be (K, B, C) with (B, C) = the teacher's {tuple(teacher_logits.shape)}, "
            f"got {tuple(student_logits.shape)}"
        )
    return (student_logits - teacher_logits.unsqueeze(0)).abs().mean(dim=(1, 2)).sum()


def apm_loss(
    student_logits: Tensor, teacher_logits: Tensor, y: Tensor, ce_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The quantity the images **minimise**: ``-discrepancy + ce_weight * CE(teacher, y)``.

    Args:
        student_logits: ``(K, B, C)``.
        teacher_logits: ``(B, C)`` (not detached: the gradient flows through the teacher too, as in the paper).
        y: ``(B,)`` class ids of the images.
        ce_weight: weight of the teacher cross-entropy (APM's scripts: 0.1).

    Returns:
        ``(loss, discrepancy, teacher_ce)``; the last two are the terms (means over the batch) for logging.
    """
    disc = l1_discrepancy(student_logits, teacher_logits)
    ce = F.cross_entropy(teacher_logits, y)
    return -disc + ce_weight * ce, disc, ce


def checkpoint_epochs(epochs: int, num_checkpoints: int) -> list[int]:
    """0-based epochs after which the K student checkpoints are kept: ``j * epochs // K`` for ``j = 1..K``.

    A student trains ``epochs + 1`` epochs (0 to ``epochs``, as APM's loop does); the first checkpoint is never the
    initial network and the last is the final one. Where ``K`` divides ``epochs`` these are APM's epochs (250, 5:
    50, 100, 150, 200, 250); otherwise APM's code keeps a different number than K, this keeps exactly K.

    Raises:
        ValueError: when ``epochs < num_checkpoints`` (two checkpoints would be the same epoch) or either is < 1.
    """
    if num_checkpoints < 1 or epochs < 1:
        raise ValueError(f"need at least one epoch and one checkpoint, got epochs={epochs}, K={num_checkpoints}")
    if epochs < num_checkpoints:
        raise ValueError(
            f"{num_checkpoints} checkpoints need at least as many epochs, got student_epochs={epochs}: "
            f"raise student_epochs or lower num_checkpoints"
        )
    return [j * epochs // num_checkpoints for j in range(1, num_checkpoints + 1)]


def stack_checkpoints(
    net: nn.Module, states: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stack K state dicts of ``net``'s architecture for ``vmap`` (``torch.func.stack_module_state``).

    Args:
        net: a module of the checkpoints' architecture (its own values are not used).
        states: K state dicts.
        device: where the stacked tensors go (default: where ``states`` are).

    Returns:
        ``(params, buffers)``, each tensor with a leading dimension K, detached (the students are fixed).
    """
    if not states:
        raise ValueError("need at least one checkpoint to stack")
    modules = []
    for state in states:
        m = copy.deepcopy(net)
        m.load_state_dict(state)
        modules.append(m.to(device) if device is not None else m)
    params, buffers = stack_module_state(modules)
    return {k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in buffers.items()}


def stacked_logits(net: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Logits of K stacked checkpoints on the same images in one batched pass: ``(K, B, C)``.

    ``net`` must behave the same for every image independently (eval mode; instance norm or batch norm with running
    statistics), which is what makes the K passes one ``vmap``.
    """

    def one(p: Mapping[str, Tensor], b: Mapping[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(net, (p, b), (images,))

    return vmap(one, in_dims=(0, 0, None))(dict(params), dict(buffers), x)


def looped_logits(net: nn.Module, states: Sequence[Mapping[str, Tensor]], x: Tensor) -> Tensor:
    """The same ``(K, B, C)`` as :func:`stacked_logits`, one checkpoint after another (the fallback)."""
    return torch.stack([functional_call(net, dict(s), (x,)) for s in states])


def apm_gradients(
    make_images: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    index: Tensor,
    y: Tensor,
    teacher: Callable[[Tensor], Tensor],
    students: Callable[[Tensor], Tensor],
    ce_weight: float,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[Tensor | None], dict[str, Tensor]]:
    """Gradient of the APM objective over the images ``index``, accumulated chunk by chunk, exactly.

    The objective is a mean over the ``B = len(index)`` images and the networks treat every image on its own, so the
    gradient with respect to each image comes from its own chunk alone: every chunk's loss is its *sum* over images
    divided by ``B``, and the per-image gradients are gathered before one backward pass into ``params``. ``chunk_size``
    therefore changes memory and time, never the result: the networks see at most ``chunk_size`` images and only
    that chunk's graph exists on ``device`` at a time. The ``B`` images themselves (and their gradient) live where
    ``make_images`` puts them, e.g. on the CPU beside the set.

    Args:
        make_images: ``index -> x`` (``(B, C, H, W)``), differentiable with respect to ``params``: a pixel set
            indexes its images, a factorised set builds only those images. Called once per call, with ``index``.
        params: the tensors to differentiate (the set's meta-parameters), wherever they live.
        index: ``(B,)`` indices of the images touched this iteration.
        y: ``(B,)`` class ids of those images (the teacher cross-entropy's targets).
        teacher: ``x -> (b, C)`` teacher logits (with gradient with respect to ``x``).
        students: ``x -> (K, b, C)`` logits of the K student checkpoints (:func:`stacked_logits` or
            :func:`looped_logits`).
        ce_weight: weight of the teacher cross-entropy.
        chunk_size: images per chunk (APM's ``update_syn``); ``None`` or ``>= B`` is one chunk.
        device: where the networks run (default: where ``make_images`` puts the images).

    Returns:
        ``(grads, values)``: one gradient per tensor of ``params`` (``None`` where it does not depend on the images;
        in its dtype, on its device) and the batch values ``objective``, ``discrepancy`` and ``teacher_ce``
        (detached float64 scalars on the CPU).
    """
    n = len(index)
    if n == 0:
        raise ValueError("APM needs at least one image per iteration (batch_syn >= 1)")
    if len(y) != n:
        raise ValueError(f"need one class id per index, got {len(y)} for {n} indices")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size (update_syn) must be a positive number of images, got {chunk_size}")
    step = n if chunk_size is None else min(int(chunk_size), n)
    params = list(params)
    x_all = make_images(index)
    grad_x = torch.zeros_like(x_all)
    totals = {"objective": 0.0, "discrepancy": 0.0, "teacher_ce": 0.0}
    for start in range(0, n, step):
        x = x_all[start : start + step].detach()
        if device is not None:
            x = x.to(device)
        x.requires_grad_(True)
        # The networks see a view, not the leaf itself: module-tracking hooks (FlopCounterMode) cannot watch a leaf
        # that autograd.grad differentiates with respect to.
        x_in = x.view_as(x)
        t = teacher(x_in)
        s = students(x_in)
        yc = y[start : start + step].to(t.device)
        # Sums over the chunk's images divided by the whole batch: the chunks add up to the batch means.
        disc = (s - t.unsqueeze(0)).abs().mean(dim=2).sum() / n
        ce = F.cross_entropy(t, yc, reduction="sum") / n
        loss = -disc + ce_weight * ce
        (g,) = torch.autograd.grad(loss, [x])
        grad_x[start : start + step] = g.to(grad_x.device, grad_x.dtype)
        totals["discrepancy"] += float(disc.detach())
        totals["teacher_ce"] += float(ce.detach())
        totals["objective"] += float(loss.detach())
    grads = torch.autograd.grad(x_all, params, grad_outputs=grad_x, allow_unused=True) if params else ()
    return list(grads), {k: torch.tensor(v, dtype=torch.float64) for k, v in totals.items()}
