"""The precision policy and every method on a CUDA GPU: what the CPU tests fake, checked on the real device.

Skipped (not passed) without a GPU; run them where one is, e.g. ``pytest -m gpu``. The CPU suite covers the same
contracts on the CPU; these add what only a GPU shows: the policy resolving bf16 from the device's own measurement,
the solves staying fp32/fp64 under CUDA autocast, bf16 meta-gradients close to float32 ones under cuDNN/cuBLAS bf16
kernels, and each method's fit, export and evaluation with its set and networks on the device.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_distill import precision as prec
from lightning_distill.callbacks import ExportDistilled
from lightning_distill.export import load_distilled
from lightning_distill.functional import krr_predict
from lightning_distill.precision import PrecisionPolicy
from tests.helpers import DevicesSeen, quiet_trainer, tiny_mnist_dm
from tests.test_method_contract import COMBOS, METHODS, SETS
from tests.test_precision import (  # noqa: F401  (_fresh_probes: the autouse fixture, each test its own probes)
    MIN_COSINE,
    _features,
    _frepo,
    _fresh_probes,
    _meta_grads,
    tiny_evaluation,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _native_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def test_auto_resolves_bf16_from_the_gpus_own_measurement():
    probe = prec.bf16_probe("cuda")
    if not _native_bf16():
        assert PrecisionPolicy("auto").resolve("cuda") == "fp32", probe.reason()
        return
    assert probe.instructions == ("cuda",)
    assert PrecisionPolicy("auto").resolve("cuda") == "bf16", probe.reason()


def test_krr_inside_cuda_bf16_autocast_stays_fp32_and_fp64():
    fs, ys, ft = (t.cuda() for t in _features())
    outside = krr_predict(fs, ys, ft)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inside = krr_predict(fs, ys, ft)
        from_bf16 = krr_predict(fs.bfloat16(), ys, ft.bfloat16())
        in64 = krr_predict(fs.double(), ys.double(), ft.double())
    assert inside.dtype == from_bf16.dtype == torch.float32 and in64.dtype == torch.float64
    # cuBLAS may pick another fp32 kernel inside the region; TF32 stays off, so the difference is rounding only.
    torch.testing.assert_close(inside, outside, rtol=1e-4, atol=1e-4)
    expected = krr_predict(fs.double(), ys.double(), ft.double())
    torch.testing.assert_close(in64, expected, rtol=1e-10, atol=1e-10)


def test_bf16_frepo_meta_gradient_agrees_with_fp32_on_the_gpu():
    grads = {}
    for mode in ("fp32", "bf16"):
        m, x_real, y_real = _frepo(mode, device="cuda")
        assert m.network_precision.dtype == mode and m.network_precision.device_type == "cuda"
        grads[mode] = _meta_grads(m, x_real, y_real)
    for a, b in zip(grads["fp32"], grads["bf16"], strict=True):
        assert b.dtype == torch.float32 and b.device.type == "cuda"
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > MIN_COSINE, f"cosine {cos:.5f}"
        assert 0.9 < b.norm() / a.norm() < 1.1


#: Every method of the contract suite on one set (learned labels where it takes them), and every set under one
#: method: a method or a set that joins ``METHODS`` or ``SETS`` is fitted on the GPU too.
_BY_METHOD = [next((m, s) for s in ("pixels_learned", *SETS) if (m, s) in COMBOS) for m in METHODS]
GPU_COMBOS = _BY_METHOD + [c for c in (next(c for c in COMBOS if c[1] == s) for s in SETS) if c not in _BY_METHOD]


@pytest.mark.parametrize("combo", GPU_COMBOS, ids="-".join)
def test_every_method_fits_exports_and_records_its_precision_on_the_gpu(combo, data_root, tmp_path):
    name, set_name = combo
    L.seed_everything(0, verbose=False)
    method = METHODS[name](SETS[set_name](), 0)
    seen = DevicesSeen()
    trainer = quiet_trainer(tmp_path, 2, [ExportDistilled(), seen], accelerator="cuda")
    trainer.fit(method, datamodule=tiny_mnist_dm(data_root, batch_size=64))
    assert seen.devices == ["cuda", "cuda"] and trainer.global_step == 2
    expected = "bf16" if method.precision_policy.mode == "auto" and _native_bf16() else "fp32"
    assert seen.precisions == [expected, expected]
    payload = load_distilled(tmp_path / "distilled.pt")
    assert payload["config"]["precision_resolved"] == expected
    assert payload["images"].device.type == "cpu" and torch.isfinite(payload["images"]).all()


def test_evaluation_on_the_gpu_under_the_policy():
    from lightning_distill.eval import train_on_distilled

    (x, y, xt, yt), kw = tiny_evaluation("cuda")
    r = train_on_distilled(x, y, xt, yt, precision="auto", **kw)
    assert r.extra["precision"]["resolved"] == ("bf16" if _native_bf16() else "fp32")
    assert 0.0 <= r.accuracies[0] <= 100.0
