"""Precision policy: detection and its fallbacks, solves untouched by bf16, bf16 meta-gradients close to float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_distill import precision as prec
from lightning_distill.components import ModelPool
from lightning_distill.functional import kernels, krr_predict
from lightning_distill.methods import FRePo, MemoriesBPTT
from lightning_distill.methods.base import MetaStep
from lightning_distill.nets import get_net
from lightning_distill.precision import FP32, PrecisionPolicy
from lightning_distill.synthetic import PixelSet
from tests.helpers import quiet_trainer, tiny_mnist_dm

#: Measured on the tiny FRePo step below (ConvNet width 8, IPC 1, 64 real images): cosine 0.9991 for the image
#: gradient and 0.99997 for the label gradient (0.9962 and 0.9994 at IPC 10 with 256 real images; Xeon with AMX,
#: torch 2.14). bf16 keeps 8 mantissa bits per activation: 0.99 leaves room for other seeds and kernels.
MIN_COSINE = 0.99
#: The tiny MemoriesBPTT step below (ConvNet width 8, 3 inner steps, memories K=4, random images), seeds 0-5 on an AMD
#: EPYC (AVX2: bf16 emulated by oneDNN), torch 2.14: cosine 0.995-0.997 for the bases, 0.979-0.993 for the
#: coefficients (each coefficient's gradient sums through a few inner steps of a width-8 net, so it rounds more).
MEMORIES_MIN_COSINE = 0.97


@pytest.fixture(autouse=True)
def _fresh_probes():
    # Each test sees its own (possibly faked) hardware: no probe measured by another test may answer for it.
    prec.clear_probe_cache()
    yield
    prec.clear_probe_cache()


def _features(seed: int = 0, m: int = 20, n: int = 50, d: int = 64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen), torch.randn(m, 10, generator=gen), torch.randn(n, d, generator=gen)


# ------------------------------------------------------------------------------------ the solves stay fp32
def test_krr_inside_bf16_autocast_equals_outside():
    fs, ys, ft = _features()
    outside = krr_predict(fs, ys, ft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = krr_predict(fs, ys, ft)
        from_bf16 = krr_predict(fs.bfloat16(), ys, ft.bfloat16())  # a bf16 network's features are solved up-cast
    assert inside.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=1e-6)
    expected = krr_predict(fs.bfloat16().float(), ys, ft.bfloat16().float())
    torch.testing.assert_close(from_bf16, expected, rtol=1e-6, atol=1e-6)


def test_gram_matrices_are_computed_in_fp32_without_autocast(monkeypatch):
    seen = []
    original = kernels.gram

    def spy(a, b):
        out = original(a, b)
        seen.append((a.dtype, b.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(kernels, "gram", spy)
    fs, ys, ft = _features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        krr_predict(fs.bfloat16(), ys.bfloat16(), ft.bfloat16())
        # A plain matmul here does run in bf16: the region is live, only the solve leaves it.
        assert (fs @ ft.T).dtype == torch.bfloat16
    assert len(seen) == 2  # K_ss and K_ts
    assert all(d == (torch.float32, torch.float32, torch.float32, False) for d in seen)


def test_float64_inputs_are_solved_in_float64_under_autocast():
    fs, ys, ft = (t.double() for t in _features())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert krr_predict(fs, ys, ft).dtype == torch.float64


# ------------------------------------------------------------------------------------------ the policy
def test_fp32_policy_is_the_identity():
    x, net = torch.randn(2, 3, 4, 4), torch.nn.Conv2d(3, 4, 3)
    p = PrecisionPolicy("fp32").bind("cpu")
    assert p == FP32 and not p.bf16
    assert p.input(x) is x and p.output(x) is x and p.module(net) is net
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert net.weight.is_contiguous()


def test_bf16_policy_autocasts_and_goes_channels_last():
    p = PrecisionPolicy("bf16").bind("cpu")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    net = p.module(torch.nn.Conv2d(3, 4, 3))
    assert net.weight.is_contiguous(memory_format=torch.channels_last)
    xi = p.input(x)
    assert xi.is_contiguous(memory_format=torch.channels_last) and p.input(torch.randn(2, 3)).dim() == 2
    with p.autocast():
        y = net(xi)
    assert y.dtype == torch.bfloat16 and p.output(y).dtype == torch.float32
    p.output(y).sum().backward()
    assert x.grad.dtype == torch.float32 and net.weight.grad.dtype == torch.float32


def test_call_is_one_pass_under_the_policy():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    seen = []

    def fn(xi):
        seen.append((torch.is_autocast_enabled("cpu"), xi.is_contiguous(memory_format=torch.channels_last)))
        return torch.nn.functional.conv2d(xi, torch.ones(4, 3, 3, 3))

    y = PrecisionPolicy("bf16").bind("cpu").call(fn, x)
    assert seen == [(True, True)] and y.dtype == torch.float32  # autocast, NHWC in, float32 out
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    y32 = FP32.call(fn, x)
    assert seen[-1] == (False, False) and torch.equal(y32, fn(x))  # fp32: fn alone
    assert torch.allclose(y, y32, rtol=0.02, atol=0.1)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        PrecisionPolicy("fp16")
    with pytest.raises(ValueError, match="precision"):
        FRePo(synthetic=PixelSet(ipc=1), precision="half")


# ---------------------------------------------------------------------------------------------- detection
def _no_measurement(*args, **kwargs):
    raise AssertionError("nothing may be measured where the hardware lacks the instructions")


def test_cpu_without_bf16_instructions_resolves_fp32(monkeypatch):
    monkeypatch.setattr(prec, "read_cpu_flags", lambda: frozenset({"avx2", "avx512f", "fma"}))
    monkeypatch.setattr(prec, "measure_matmul_seconds", _no_measurement)
    assert PrecisionPolicy("auto").resolve("cpu") == "fp32"
    assert "no amx_bf16/avx512_bf16" in PrecisionPolicy("auto").bind("cpu").reason
    # An explicit request is honoured whatever the hardware.
    assert PrecisionPolicy("bf16").resolve("cpu") == "bf16"


def test_unreadable_cpuinfo_falls_back_to_torchs_checks(monkeypatch):
    monkeypatch.setattr(prec, "read_cpu_flags", lambda: None)
    monkeypatch.setattr(prec, "_torch_cpu_bf16_instructions", lambda: ())
    monkeypatch.setattr(prec, "measure_matmul_seconds", _no_measurement)
    assert PrecisionPolicy("auto").resolve("cpu") == "fp32"


@pytest.mark.parametrize(("fp32_s", "bf16_s", "expected"), [(1.0, 1.0, "fp32"), (1.0, 0.8, "fp32"), (3.0, 1.0, "bf16")])
def test_instructions_present_but_the_measurement_decides(monkeypatch, fp32_s, bf16_s, expected):
    calls = []
    monkeypatch.setattr(prec, "read_cpu_flags", lambda: frozenset({"amx_bf16", "avx512f"}))
    monkeypatch.setattr(prec, "measure_matmul_seconds", lambda d: calls.append(d) or (fp32_s, bf16_s))
    assert PrecisionPolicy("auto").resolve("cpu") == expected
    assert PrecisionPolicy("auto").resolve("cpu") == expected
    assert len(calls) == 1  # measured once per process (and thread count), then cached
    probe = prec.bf16_probe("cpu")
    assert probe.instructions == ("amx_bf16",) and probe.speedup == pytest.approx(fp32_s / bf16_s)


def test_without_cuda_a_cuda_device_is_not_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "measure_matmul_seconds", _no_measurement)
    assert PrecisionPolicy("auto").resolve("cuda") == "fp32"
    assert prec.bf16_probe("cuda").instructions == ()
    assert PrecisionPolicy("auto").resolve("meta") == "fp32"  # device types without a check are not assumed


def test_read_cpu_flags_parses_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    monkeypatch.setattr(prec, "_CPUINFO", info)
    assert prec.read_cpu_flags() >= {"amx_bf16", "avx512f"}
    assert prec.cpu_bf16_instructions() == ("amx_bf16",)
    monkeypatch.setattr(prec, "_CPUINFO", tmp_path / "missing")
    assert prec.read_cpu_flags() is None


def test_auto_on_this_machine_resolves_bf16():
    if not prec.cpu_bf16_instructions():
        pytest.skip("this CPU has neither amx_bf16 nor avx512_bf16")
    probe = prec.bf16_probe("cpu")
    assert PrecisionPolicy("auto").resolve("cpu") == "bf16", probe.reason()


# ------------------------------------------------------------------------------------------------- FRePo
def _frepo(mode: str, ipc: int = 1, batch: int = 64, device: str = "cpu") -> tuple[FRePo, torch.Tensor, torch.Tensor]:
    shape = (1, 28, 28)
    m = FRePo(synthetic=PixelSet(ipc=ipc, labels="learned"), arch_kwargs={"width": 8}, pool_size=2, precision=mode)
    m.to(device)  # before set-up: the policy binds to, and the pool is built on, the method's device
    gen = torch.Generator().manual_seed(0)
    x_real = torch.randn(batch, *shape, generator=gen).to(device)
    y_real = (torch.arange(batch) % 10).to(device)
    m.synthetic.build(10, shape)
    m.synthetic.to(device)
    m.synthetic.initialise(x_real, y_real, torch.Generator().manual_seed(1))
    m.setup_method(SimpleNamespace(num_classes=10, image_shape=shape, x_train=x_real, y_train=y_real))
    return m, x_real, y_real


def _meta_grads(m: FRePo, x_real: torch.Tensor, y_real: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x_syn, y_syn = m.synthetic()
    loss = m.outer_loss(x_syn, y_syn, x_real, y_real).loss
    return torch.autograd.grad(loss, [m.synthetic.images, m.synthetic.labels])


def test_bf16_frepo_meta_gradient_agrees_with_fp32():
    g32 = _meta_grads(*_frepo("fp32"))
    m16, x_real, y_real = _frepo("bf16")
    assert m16.pool.precision.bf16
    g16 = _meta_grads(m16, x_real, y_real)
    for a, b in zip(g32, g16, strict=True):
        assert b.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > MIN_COSINE, f"cosine {cos:.5f}"
        assert 0.9 < b.norm() / a.norm() < 1.1


def test_bf16_frepo_online_step_keeps_float32_state():
    m, x_real, y_real = _frepo("bf16")
    (idx,) = m.pool_members
    before = {k: v.clone() for k, v in m.pool.params(idx).items()}
    m.after_outer_step(x_real, y_real)
    params = m.pool.params(idx)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(not torch.equal(before[k], p) for k, p in params.items())  # it did train
    assert all(torch.isfinite(p).all() for p in params.values())


def _memories_step(mode: str, seed: int = 0) -> tuple[MetaStep, MemoriesBPTT]:
    """One outer step of a tiny MemoriesBPTT (ConvNet width 8, 3 inner steps) on random data, the same draws."""
    from lightning_distill.synthetic import AddressableMemories

    shape = (1, 28, 28)
    gen = torch.Generator().manual_seed(seed)
    x_real, y_real = torch.randn(100, *shape, generator=gen), torch.arange(100) % 10
    m = MemoriesBPTT(
        synthetic=AddressableMemories(ipc=1, num_bases=4, rows_per_class=3),
        arch_kwargs={"width": 8, "depth": 2},
        inner_steps=3,
        per_class_batch=2,
        precision=mode,
    )
    m.synthetic.build(10, shape)
    m.synthetic.initialise(x_real, y_real, torch.Generator().manual_seed(1))
    m.setup_method(SimpleNamespace(num_classes=10, image_shape=shape, x_train=x_real, y_train=y_real))
    return m.outer_loss(None, None, x_real, y_real), m


def test_bf16_memories_hypergradient_agrees_with_fp32():
    (s32, m32), (s16, m16) = _memories_step("fp32"), _memories_step("bf16")
    assert m16.network_precision.bf16 and not m32.network_precision.bf16
    assert m16.config()["precision_resolved"] == "bf16"
    assert s16.grads.keys() == s32.grads.keys() == {"synthetic.bases", "synthetic.coefficients"}
    for name, g32 in s32.grads.items():
        g16 = s16.grads[name]
        assert g16.dtype == torch.float32  # the adjoints and the hyper-gradient stay float32
        cos = torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)
        assert cos > MEMORIES_MIN_COSINE, f"{name}: cosine {cos:.5f}"
        assert 0.9 < g16.norm() / g32.norm() < 1.1
    assert float(s16.value) == pytest.approx(float(s32.value), rel=0.02)


def test_precision_is_recorded_in_the_config():
    assert _frepo("fp32")[0].config()["precision_resolved"] == "fp32"
    cfg = _frepo("bf16")[0].config()
    assert cfg["precision"] == "bf16" and cfg["precision_resolved"] == "bf16"
    assert cfg["precision_requested"] == "bf16"


def test_the_default_is_the_environment_else_auto(monkeypatch):
    from lightning_distill.methods import RandomSubset

    monkeypatch.delenv(prec.PRECISION_ENV, raising=False)
    assert prec.default_precision() == "auto" and PrecisionPolicy(None).mode == "auto"
    method = FRePo(synthetic=PixelSet(ipc=1))
    assert method.hparams["precision"] is None and method.precision_policy.mode == "auto"
    assert MemoriesBPTT(synthetic=PixelSet(ipc=1)).precision_policy.mode == "auto"
    # A method without network passes pins float32 whatever the default.
    assert RandomSubset(synthetic=PixelSet(ipc=1)).precision_policy.mode == "fp32"
    monkeypatch.setenv(prec.PRECISION_ENV, " BF16 ")
    assert FRePo(synthetic=PixelSet(ipc=1)).precision_policy.mode == "bf16"
    assert FRePo(synthetic=PixelSet(ipc=1), precision="fp32").precision_policy.mode == "fp32"  # a recipe wins
    monkeypatch.setenv(prec.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="LIGHTNING_DISTILL_PRECISION='fp16' is not a precision"):
        FRePo(synthetic=PixelSet(ipc=1))


def test_fp32_pool_passes_are_bitwise_the_policy_free_ones():
    def factory() -> torch.nn.Module:
        return get_net("convnet_frepo", 1, 10, 28, width=8)

    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a, b = ModelPool(factory, size=1), ModelPool(factory, size=1, precision=PrecisionPolicy("fp32").bind("cpu"))
    assert torch.equal(a.features(0, x), b.features(0, x))
    net = factory()
    net.load_state_dict({**a.params(0), **a.buffers(0)})
    assert torch.equal(a.features(0, x), net.eval()(x, features_only=True))


def test_one_channel_batches_become_truly_channels_last():
    # A (N, 1, H, W) batch counts as channels-last contiguous as it is, yet convolutions read its strides and run
    # the whole network in NCHW, where bf16 pooling is slow: the policy must give it NHWC strides.
    p = PrecisionPolicy("bf16").bind("cpu")
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    xi = p.input(x)
    assert xi.stride() == (784, 1, 28, 1)
    conv = torch.nn.Conv2d(1, 8, 3)
    with p.autocast():
        y = conv(xi)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    y.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_fit_logs_and_exports_the_resolved_precision(data_root, tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    m = FRePo(synthetic=PixelSet(ipc=1, labels="learned"), arch_kwargs={"width": 8}, pool_size=2, precision="bf16")
    logger = CSVLogger(tmp_path, name="log", version=0)
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path, 2, logger=logger, log_every_n_steps=1).fit(
            m, datamodule=tiny_mnist_dm(data_root, batch_size=32)
        )
    assert "FRePo: network passes in bf16 (bf16 requested" in caplog.text
    import csv

    rows = list(csv.DictReader((tmp_path / "log" / "version_0" / "metrics.csv").open()))
    logged = [r["train/precision_bf16"] for r in rows if r.get("train/precision_bf16")]
    assert logged == ["1.0"]  # once per fit
    assert m.export_payload()["config"]["precision_resolved"] == "bf16"


# ------------------------------------------------------------------------------------------- evaluation
def tiny_evaluation(device: str) -> tuple[tuple[torch.Tensor, ...], dict]:
    """A 20-image set, 50 test images and the options of a 3-step krr evaluation of it on ``device``."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 28, 28, generator=gen), torch.arange(20) % 10
    xt, yt = torch.randn(50, 1, 28, 28, generator=gen), torch.arange(50) % 10
    kw = {"protocol": "krr", "repeats": 1, "steps": 3, "flip": False, "device": device, "progress": False}
    return (x, y, xt, yt), {**kw, "arch_kwargs": {"width": 8}}


def test_evaluation_under_bf16_runs_and_is_recorded():
    from lightning_distill.eval import train_on_distilled

    (x, y, xt, yt), kw = tiny_evaluation("cpu")
    r32 = train_on_distilled(x, y, xt, yt, **kw)
    r16 = train_on_distilled(x, y, xt, yt, precision="bf16", **kw)
    assert r32.extra["precision"]["resolved"] == "fp32" and r16.extra["precision"]["resolved"] == "bf16"
    assert r32.accuracies == train_on_distilled(x, y, xt, yt, precision="fp32", **kw).accuracies
    assert 0.0 <= r16.accuracies[0] <= 100.0


# ------------------------------------------------------------------------------------------- benchmark
def test_speed_compares_fp32_with_the_policy(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    cmd = [sys.executable, str(bench / "speed.py"), "--steps", "2", "--ipcs", "1", "--device", "cpu"]
    cmd += ["--profile", "smoke", "--matmul-size", "128", "--threads", "1", "--out", str(tmp_path), "--name", "p"]
    cmd += ["--precision", "fp32,policy", "--methods", "FRePo", "RandomSubset", "--inputs", "28px grey"]
    cmd += ["--profile-top", "3"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["precisions"] == ["fp32", "auto"] and [r["dtype"] for r in res["matmul_rates"]][0] == "float32"
    frepo = [r for r in res["rows"] if r["method"] == "FRePo"]
    assert [r["precision"] for r in frepo] == ["fp32", "auto"] and frepo[0]["precision_resolved"] == "fp32"
    assert frepo[1]["precision_resolved"] == prec.PrecisionPolicy("auto").resolve("cpu")
    assert frepo[1]["speedup_vs_first"] > 0 and all(len(r["all_ms"]) == 2 and len(r["profile"]) == 3 for r in frepo)
    assert [r["precision"] for r in res["rows"] if r["method"] == "RandomSubset"] == ["fp32"]  # no argument: once
    md = (tmp_path / "p.md").read_text()
    assert "| FRePo | 28px grey | 1 | 64 |" in md and "| fp32 |" in md and "auto → " in md and "### One step" in md
