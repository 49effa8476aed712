"""APM: the chunked gradient is exact, vmap equals the loop, the sign of the update, students, labels, protocol."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill.components import TeacherSpec
from lightning_distill.eval import train_on_distilled
from lightning_distill.functional.apm import (
    apm_gradients,
    apm_loss,
    checkpoint_epochs,
    l1_discrepancy,
    looped_logits,
    stack_checkpoints,
    stacked_logits,
)
from lightning_distill.methods import APM
from lightning_distill.nets import get_net, seeded_net
from lightning_distill.synthetic import PixelSet
from tests.helpers import DevicesSeen, quiet_trainer, tiny_mnist_dm

# A tiny but complete APM: 2 teachers trained 2 epochs, width-8 networks, K=2 checkpoints of 4-epoch students.
TINY_TEACHERS = {"arch_kwargs": {"width": 8}, "num_teachers": 2, "epochs": 2}


def tiny_apm(synthetic=None, seed=0, **kwargs):
    options = {
        "arch_kwargs": {"width": 8},
        "teachers": TeacherSpec(**TINY_TEACHERS),
        "student_epochs": 4,
        "num_checkpoints": 2,
        "mid_gap": 1,
        "lr_img": 0.1,
        **kwargs,
    }
    return APM(synthetic=synthetic or PixelSet(ipc=2), seed=seed, **options)


# ------------------------------------------------------------------------------------------- the pure maths
def _nets(k=3, classes=4, dtype=torch.float64):
    """A teacher and K student states of a tiny ConvNet (instance norm), in ``dtype``."""

    def build():
        return get_net("convnet", 1, classes, 8, width=4, depth=2)

    teacher = seeded_net(build, 100).to(dtype).eval()
    template = build().to(dtype).eval()
    states = [{n: v.to(dtype) for n, v in seeded_net(build, i).state_dict().items()} for i in range(k)]
    return teacher, template, states


def _problem(n=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype, requires_grad=True)
    y = torch.arange(n) % 4
    return images, y


def _grad(images, y, teacher, students, chunk, index=None, ce_weight=0.1):
    index = torch.arange(len(images)) if index is None else index
    grads, values = apm_gradients(
        lambda idx: images[idx], [images], index, y[index], teacher, students, ce_weight, chunk_size=chunk
    )
    return grads[0], values


def test_chunked_gradient_equals_the_unchunked_one():
    images, y = _problem(n=10)
    teacher, template, states = _nets()
    params, buffers = stack_checkpoints(template, states)

    def students(x):
        return stacked_logits(template, params, buffers, x)

    whole, values = _grad(images, y, teacher, students, chunk=None)
    assert whole.dtype == torch.float64 and whole.device.type == "cpu"  # the set's dtype and device
    assert whole.abs().sum() > 0
    for chunk in (1, 3, 4, 7, 10, 64):
        g, v = _grad(images, y, teacher, students, chunk=chunk)
        torch.testing.assert_close(g, whole, rtol=1e-10, atol=1e-13, msg=f"chunk {chunk}")
        for key in values:
            torch.testing.assert_close(v[key], values[key], rtol=1e-10, atol=1e-13)


def test_chunked_gradient_of_a_factorised_set_is_exact_too():
    # The set's parameters are bases and coefficients; images are built per chunk of indices.
    g = torch.Generator().manual_seed(1)
    bases = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    coef = torch.rand(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(9) % 4
    teacher, template, states = _nets(k=2)

    def make(idx):
        return (coef[idx] @ bases.flatten(1)).view(len(idx), 1, 8, 8)

    def students(x):
        return looped_logits(template, states, x)

    index = torch.tensor([0, 2, 3, 5, 8])
    ref, _ = apm_gradients(make, [bases, coef], index, y[index], teacher, students, 0.1, chunk_size=None)
    for chunk in (1, 2, 4):
        got, _ = apm_gradients(make, [bases, coef], index, y[index], teacher, students, 0.1, chunk_size=chunk)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # Coefficients of images not touched get no gradient.
    untouched = torch.tensor([1, 4, 6, 7])
    assert ref[1][untouched].abs().sum() == 0 and ref[1][index].abs().sum() > 0


def test_vmap_over_checkpoints_equals_the_loop():
    images, y = _problem(n=6)
    teacher, template, states = _nets(k=3)
    params, buffers = stack_checkpoints(template, states)
    x = images.detach()
    torch.testing.assert_close(stacked_logits(template, params, buffers, x), looped_logits(template, states, x))
    g_vmap, v_vmap = _grad(images, y, teacher, lambda x: stacked_logits(template, params, buffers, x), chunk=4)
    g_loop, v_loop = _grad(images, y, teacher, lambda x: looped_logits(template, states, x), chunk=4)
    torch.testing.assert_close(g_vmap, g_loop, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(v_vmap["objective"], v_loop["objective"])


def test_objective_is_minus_the_discrepancy_plus_weighted_teacher_ce():
    images, y = _problem(n=8)
    teacher, template, states = _nets(k=2)
    x = images.detach()
    s, t = looped_logits(template, states, x), teacher(x)
    # The discrepancy is summed over checkpoints, averaged over images and classes (F.l1_loss per checkpoint).
    expected = sum(torch.nn.functional.l1_loss(s[k], t) for k in range(2))
    torch.testing.assert_close(l1_discrepancy(s, t), expected)
    loss, disc, ce = apm_loss(s, t, y, ce_weight=0.5)
    torch.testing.assert_close(loss, -expected + 0.5 * torch.nn.functional.cross_entropy(t, y))
    _, values = _grad(images, y, teacher, lambda x: looped_logits(template, states, x), chunk=3, ce_weight=0.5)
    torch.testing.assert_close(values["objective"], loss.detach())
    torch.testing.assert_close(values["discrepancy"], disc.detach())


def test_a_descent_step_on_the_objective_increases_the_discrepancy():
    # The sign: the images ascend the teacher-student discrepancy (ce_weight 0 isolates it).
    images, y = _problem(n=8)
    teacher, template, states = _nets(k=3)

    def disc(x):
        with torch.no_grad():
            return float(l1_discrepancy(looped_logits(template, states, x), teacher(x)))

    g, _ = _grad(images, y, teacher, lambda x: looped_logits(template, states, x), chunk=3, ce_weight=0.0)
    before = disc(images.detach())
    after = disc(images.detach() - 0.5 * g)
    assert after > before


def test_checkpoint_epochs_are_apms():
    assert checkpoint_epochs(250, 5) == [50, 100, 150, 200, 250]
    assert checkpoint_epochs(10, 3) == [3, 6, 10]  # exactly K, the last one final
    with pytest.raises(ValueError, match="raise student_epochs or lower num_checkpoints"):
        checkpoint_epochs(2, 5)


# ------------------------------------------------------------------------------------------------ the method
def _fit(root, tmp_path, steps, callbacks=None, **kwargs):
    L.seed_everything(0, verbose=False)
    method = tiny_apm(**kwargs)
    trainer = quiet_trainer(tmp_path, steps, callbacks)
    trainer.fit(method, datamodule=tiny_mnist_dm(root, batch_size=32))
    return method


class _Before(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images = pl_module.synthetic.images.detach().clone()


def test_one_update_increases_the_discrepancy_on_the_updated_images(data_root, tmp_path):
    before = _Before()
    method = _fit(data_root, tmp_path, 1, [before], ce_weight=0.1, lr_img=0.05)
    teacher = method.pool.net(method.teacher_index)
    assert method.students is not None and len(method.students) == 2

    @torch.no_grad()
    def disc(x):
        return float(l1_discrepancy(method._student_logits(x), teacher(x)))

    after = method.synthetic.images.detach()
    assert not torch.equal(after, before.images)
    assert disc(after) > disc(before.images)


def test_students_are_retrained_every_mid_gap_plus_one_steps(data_root, tmp_path, monkeypatch):
    calls = []
    original = APM.train_students

    def spy(self, x, targets, seed):
        calls.append(int(self.trainer.global_step))
        states = original(self, x, targets, seed)
        # The targets are the drawn teacher's logits on exactly these images.
        torch.testing.assert_close(targets, self.pool.logits(self.teacher_index, x))
        return states

    monkeypatch.setattr(APM, "train_students", spy)
    _fit(data_root, tmp_path, 7, mid_gap=2)
    assert calls == [0, 3, 6]


def test_student_schedule_is_apms():
    method = tiny_apm(student_epochs=250, num_checkpoints=5, student_batch=256)
    protocol, steps, keep = method.student_seed_protocol(500)  # 2 batches an epoch, E + 1 = 251 epochs
    assert steps == 251 * 2 and keep == [102, 202, 302, 402, 502]
    assert protocol.loss == "l1_mean" and protocol.optimizer == "sgd" and protocol.lr == method.student_lr
    assert (protocol.momentum, protocol.weight_decay, protocol.augment) == (0.9, 5e-4, "dsa")


def test_chunk_size_never_changes_the_result(data_root, tmp_path):
    a = _fit(data_root, tmp_path / "a", 2, update_syn=None)
    b = _fit(data_root, tmp_path / "b", 2, update_syn=3)
    torch.testing.assert_close(a.synthetic.images, b.synthetic.images, rtol=1e-5, atol=1e-6)


def test_batch_syn_updates_only_the_touched_images(data_root, tmp_path):
    before = _Before()
    method = _fit(data_root, tmp_path, 1, [before], batch_syn=5)
    moved = (method.synthetic.images.detach() - before.images).flatten(1).abs().sum(1) > 0
    assert int(moved.sum()) == 5


def test_export_stores_teacher_logits_and_their_storage(data_root, tmp_path):
    from lightning_distill.callbacks import ExportDistilled
    from lightning_distill.export import load_distilled

    method = _fit(data_root, tmp_path, 2, [ExportDistilled()], label_teacher=1)
    payload = load_distilled(tmp_path / "distilled.pt")
    assert payload["label_kind"] == "logits"
    expected = method.pool.logits(1, payload["images"])
    torch.testing.assert_close(payload["labels"], expected)
    n, k = payload["labels"].shape
    assert payload["storage"]["label_floats"] == n * k and payload["storage"]["floats"] == payload["images"].numel()
    assert payload["config"]["teachers"]["num_teachers"] == 2
    # The dc protocol keeps treating such labels as classes (their argmax).
    x_te, y_te = torch.randn(20, 1, 28, 28), torch.arange(20) % 10
    r = train_on_distilled(
        payload["images"],
        payload["labels"],
        x_te,
        y_te,
        protocol="dc",
        repeats=1,
        steps=2,
        flip=False,
        arch_kwargs={"width": 8},
        progress=False,
        device="cpu",
    )
    assert r.extra["labels"] == "argmax class"


def test_apm_protocol_trains_on_teacher_logits(data_root):
    # A tiny set: 50 real images labelled by a teacher's logits; the apm protocol regresses them with L1.
    from lightning_distill.components import load_teacher_pool

    dm = tiny_mnist_dm(data_root)
    dm.setup("fit")
    pool = load_teacher_pool(dm, TeacherSpec(arch_kwargs={"width": 16}, num_teachers=1, epochs=4), device="cpu")
    x = dm.x_train[:50]
    logits = pool.logits(0, x)
    teacher_acc = float((pool.net(0)(dm.x_test).argmax(1) == dm.y_test).float().mean() * 100)
    r = train_on_distilled(
        x,
        logits,
        dm.x_test,
        dm.y_test,
        protocol="apm",
        repeats=1,
        steps=60,
        flip=False,
        arch_kwargs={"width": 16},
        progress=False,
        device="cpu",
    )
    assert r.protocol == "apm" and r.extra["labels"] == "as stored"
    assert r.extra["protocol"]["loss"] == "l1_mean" and r.extra["protocol"]["lr"] == 0.01
    assert teacher_acc > 30 and r.mean > 25, (teacher_acc, r.mean)  # well above chance (10 %)


def test_bad_arguments_are_refused_with_the_fix(data_root, tmp_path):
    with pytest.raises(ValueError, match="update_syn must be a positive number of images"):
        tiny_apm(update_syn=0)
    with pytest.raises(ValueError, match="label_teacher=5 but the pool has 2 teachers"):
        tiny_apm(label_teacher=5)
    with pytest.raises(ValueError, match="raise student_epochs"):
        tiny_apm(student_epochs=1, num_checkpoints=2)
    with pytest.raises(ValueError, match="use a set with hard labels"):
        quiet_trainer(tmp_path, 1).fit(tiny_apm(PixelSet(ipc=1, labels="learned")), datamodule=tiny_mnist_dm(data_root))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_set_on_cpu_while_networks_run_on_the_accelerator(data_root, tmp_path):
    L.seed_everything(0, verbose=False)
    method = tiny_apm(set_on_cpu=True, update_syn=4)
    seen = DevicesSeen()
    trainer = quiet_trainer(tmp_path, 2, [seen], accelerator="cuda")
    trainer.fit(method, datamodule=tiny_mnist_dm(data_root, batch_size=32))
    assert seen.devices == ["cuda", "cuda"] and seen.set_devices == ["cpu", "cpu"]
    assert method.skipped_steps == 0
