"""Tests for lightning_distill.augment: functional ops against their formulas, gradients, seeded replay."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.augment import (
    DSA,
    KRRAugment,
    affine,
    brightness,
    contrast,
    cutout,
    flip,
    rotate,
    saturation,
    scale,
    translate,
)
from lightning_distill.augment._common import unit_to_int
from lightning_distill.augment.dsa import DSA_OPS
from lightning_distill.augment.krr_augment import KRR_OPS

F64 = torch.float64


def _images(b: int = 3, c: int = 3, h: int = 6, w: int = 6, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _shift_reference(x: torch.Tensor, sx: int, sy: int) -> torch.Tensor:
    """Roll, then zero the rows/columns that wrapped around."""
    out = torch.roll(x, shifts=(sy, sx), dims=(-2, -1))
    if sy > 0:
        out[..., :sy, :] = 0
    elif sy < 0:
        out[..., sy:, :] = 0
    if sx > 0:
        out[..., :, :sx] = 0
    elif sx < 0:
        out[..., :, sx:] = 0
    return out


# --- functional ops: formulas ----------------------------------------------------------------------------------------


class TestColour:
    def test_brightness_feature(self) -> None:
        x = _images()
        delta = torch.tensor([0.3, -0.2, 0.0], dtype=F64)
        torch.testing.assert_close(brightness(x, delta), x + delta.view(3, 1, 1, 1), rtol=0, atol=0)

    def test_saturation_feature(self) -> None:
        x = _images()
        factor = torch.tensor([0.0, 1.0, 1.7], dtype=F64)
        mean = x.mean(dim=1, keepdim=True)
        expected = (x - mean) * factor.view(3, 1, 1, 1) + mean
        out = saturation(x, factor)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(out[1], x[1])  # factor 1 is the identity
        torch.testing.assert_close(out[0], mean[0].expand(3, 6, 6))  # factor 0 leaves the channel mean (grey)

    def test_contrast_feature(self) -> None:
        x = _images()
        factor = torch.tensor([0.5, 1.0, 1.5], dtype=F64)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(contrast(x, factor), (x - mean) * factor.view(3, 1, 1, 1) + mean, rtol=0, atol=0)

    def test_never_clamps(self) -> None:
        x = _images() * 10  # far outside [0, 1], like ZCA-whitened inputs
        out = brightness(x, torch.tensor([5.0]))
        assert out.max() > 1 and out.min() < 0
        torch.testing.assert_close(out, x + 5)

    def test_broadcast_length_one(self) -> None:
        x = _images()
        torch.testing.assert_close(contrast(x, torch.tensor([1.3])), contrast(x, torch.full((3,), 1.3)))

    def test_exception_wrong_length(self) -> None:
        with pytest.raises(ValueError, match="batch size"):
            brightness(_images(b=3), torch.zeros(2))
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            brightness(torch.zeros(3, 4, 4), torch.zeros(1))


class TestGeometric:
    def test_flip_feature(self) -> None:
        x = _images()
        out = flip(x, torch.tensor([True, False, True]))
        torch.testing.assert_close(out[0], torch.flip(x[0], dims=[-1]), rtol=0, atol=0)
        torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)
        torch.testing.assert_close(out[2], torch.flip(x[2], dims=[-1]), rtol=0, atol=0)

    @pytest.mark.parametrize(("sx", "sy"), [(0, 0), (2, 0), (0, -1), (-3, 2), (7, 0)])
    def test_translate_feature(self, sx: int, sy: int) -> None:
        x = _images(h=5, w=6)
        out = translate(x, torch.tensor([float(sx)]), torch.tensor([float(sy)]))
        torch.testing.assert_close(out, _shift_reference(x, sx, sy), rtol=0, atol=0)

    def test_translate_per_image(self) -> None:
        x = _images()
        out = translate(x, torch.tensor([1, -2, 0]), torch.tensor([0, 1, -1]))
        for i, (sx, sy) in enumerate([(1, 0), (-2, 1), (0, -1)]):
            torch.testing.assert_close(out[i], _shift_reference(x[i], sx, sy), rtol=0, atol=0)

    def test_affine_integer_shift_matches_translate(self) -> None:
        x = _images()
        out = affine(x, shift_x=torch.tensor([2.0]), shift_y=torch.tensor([-1.0]))
        torch.testing.assert_close(out, translate(x, torch.tensor([2]), torch.tensor([-1])), rtol=0, atol=1e-12)

    def test_cutout_feature(self) -> None:
        x = _images(h=6, w=7)
        out = cutout(x, torch.tensor([3, 0, 6]), torch.tensor([2, 5, 0]), 2)
        expected = x.clone()
        expected[0, :, 1:3, 2:4] = 0  # rows/cols [centre - 1, centre + 1)
        expected[1, :, 4:6, 0:1] = 0  # clipped at the left border
        expected[2, :, 0:1, 5:7] = 0  # clipped at the top border
        torch.testing.assert_close(out, expected, rtol=0, atol=0)

    def test_cutout_odd_size(self) -> None:
        x = _images(b=1)
        expected = x.clone()
        expected[..., 1:4, 2:5] = 0
        torch.testing.assert_close(cutout(x, torch.tensor([3]), torch.tensor([2]), 3), expected, rtol=0, atol=0)

    def test_rotate_zero_is_identity(self) -> None:
        x = _images()
        torch.testing.assert_close(rotate(x, torch.zeros(3, dtype=F64)), x, rtol=0, atol=1e-12)

    def test_scale_one_is_identity(self) -> None:
        x = _images()
        torch.testing.assert_close(scale(x, torch.ones(1), torch.ones(1)), x, rtol=0, atol=1e-12)

    def test_rotate_90_is_rot90(self) -> None:
        x = _images(h=5, w=5)
        # Counter-clockwise as displayed; cos(90°) is 6e-17, not 0, so border pixels pick up ~1e-16 of a zero pad.
        torch.testing.assert_close(
            rotate(x, torch.tensor([90.0])), torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            rotate(x, torch.tensor([-90.0])), torch.rot90(x, -1, dims=(-2, -1)), rtol=0, atol=1e-12
        )

    def test_scale_zoom_two_centre(self) -> None:
        # Magnifying by 2 about the centre of a 5x5 image puts input pixel (2, 2) at (2, 2) and (2, 3) at (2, 4).
        x = _images(b=1, c=1, h=5, w=5)
        out = scale(x, torch.tensor([2.0]), torch.tensor([2.0]))
        torch.testing.assert_close(out[0, 0, 2, 2], x[0, 0, 2, 2])
        torch.testing.assert_close(out[0, 0, 2, 4], x[0, 0, 2, 3])
        torch.testing.assert_close(out[0, 0, 2, 3], (x[0, 0, 2, 2] + x[0, 0, 2, 3]) / 2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_dtype_kept(self, dtype: torch.dtype) -> None:
        x = _images(dtype=dtype)
        assert rotate(x, torch.tensor([10.0])).dtype == dtype
        assert translate(x, torch.tensor([1]), torch.tensor([1])).dtype == dtype


OPS_FOR_GRADCHECK = {
    "brightness": lambda x: brightness(x, torch.tensor([0.3, -0.1], dtype=F64)),
    "saturation": lambda x: saturation(x, torch.tensor([1.4, 0.3], dtype=F64)),
    "contrast": lambda x: contrast(x, torch.tensor([0.7, 1.2], dtype=F64)),
    "flip": lambda x: flip(x, torch.tensor([True, False])),
    "translate": lambda x: translate(x, torch.tensor([1, -1]), torch.tensor([0, 2])),
    "cutout": lambda x: cutout(x, torch.tensor([1, 3]), torch.tensor([2, 0]), 2),
    "rotate": lambda x: rotate(x, torch.tensor([13.0, -7.0], dtype=F64)),
    "scale": lambda x: scale(x, torch.tensor([1.1, 0.9], dtype=F64), torch.tensor([0.85, 1.2], dtype=F64)),
    "affine": lambda x: affine(x, 5.0, 1.1, 0.9, 0.4, -0.3),
}


@pytest.mark.parametrize("name", sorted(OPS_FOR_GRADCHECK))
def test_gradcheck(name: str) -> None:
    x = _images(b=2, c=2, h=4, w=4).requires_grad_()
    assert torch.autograd.gradcheck(OPS_FOR_GRADCHECK[name], (x,))


# --- DSA ---------------------------------------------------------------------------------------------------------


def _dsa_single(op: str, batchwise: bool = True) -> DSA:
    return DSA(strategy=op, batchwise=batchwise)


class TestDSA:
    def test_smoke_is_module_without_parameters(self) -> None:
        aug = DSA()
        assert isinstance(aug, torch.nn.Module)
        assert list(aug.parameters()) == []
        assert aug.ops == ("color", "crop", "cutout", "flip", "scale", "rotate")
        assert "flip" not in DSA("color_crop_cutout_scale_rotate").ops

    @pytest.mark.parametrize("bad", ["color_blur", "", "color_color"])
    def test_exception_unknown_op(self, bad: str) -> None:
        with pytest.raises(ValueError, match="known ops: color, crop, cutout, flip, scale, rotate"):
            DSA(strategy=bad)

    def test_exception_needs_generator(self) -> None:
        with pytest.raises(ValueError, match="generator"):
            DSA()(_images())

    @pytest.mark.parametrize("op", DSA_OPS)
    @pytest.mark.parametrize("batchwise", [True, False])
    def test_cardinality(self, op: str, batchwise: bool) -> None:
        x = _images(b=4, h=8, w=8, dtype=torch.float32)
        out = _dsa_single(op, batchwise)(x, generator=_gen())
        assert out.shape == x.shape and out.dtype == x.dtype

    def test_color_formula(self) -> None:
        x = _images()
        aug = _dsa_single("color", batchwise=False)
        p = aug.sample(3, _gen(3))
        b, s, c = (p[k].to(F64).view(3, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
        y = x + b
        y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
        y = (y - y.mean((1, 2, 3), keepdim=True)) * c + y.mean((1, 2, 3), keepdim=True)
        torch.testing.assert_close(aug.apply(x, p), y)

    def test_crop_and_cutout_pixels(self) -> None:
        # 32 px: shift bound int(32 * 0.125 + 0.5) = 4, so u in [0, 1) maps onto {-4, ..., 4}; hole side 16.
        x = _images(b=1, c=1, h=32, w=32)
        aug = DSA()
        p = {"op": "crop", "crop_x": torch.tensor([0.0]), "crop_y": torch.tensor([0.999])}
        torch.testing.assert_close(aug.apply(x, p), _shift_reference(x, -4, 4), rtol=0, atol=0)
        p = {"op": "cutout", "cutout_x": torch.tensor([0.5]), "cutout_y": torch.tensor([0.0])}
        expected = x.clone()
        expected[..., 0:8, 8:24] = 0  # centre (x=16, y=0), rows [-8, 8), cols [8, 24)
        torch.testing.assert_close(aug.apply(x, p), expected, rtol=0, atol=0)

    def test_param_ranges(self) -> None:
        g = _gen(1)
        p = _dsa_single("color", False).sample(2000, g)
        assert p["brightness"].min() >= -0.5 and p["brightness"].max() < 0.5
        assert p["saturation"].min() >= 0 and p["saturation"].max() < 2.0
        assert p["contrast"].min() >= 0.5 and p["contrast"].max() < 1.5
        p = _dsa_single("scale", False).sample(2000, g)
        assert p["zoom_x"].min() >= 1 / 1.2 - 1e-6 and p["zoom_y"].max() <= 1.2 + 1e-6
        p = _dsa_single("rotate", False).sample(2000, g)
        assert p["angle"].abs().max() <= 15.0 and p["angle"].abs().max() > 14.0
        p = _dsa_single("flip", False).sample(2000, g)
        assert 0.45 < p["flip"].float().mean() < 0.55

    def test_unit_to_int_is_uniform(self) -> None:
        u = (torch.arange(900) + 0.5) / 900
        counts = torch.bincount((unit_to_int(u, -4, 4) + 4).long())
        assert counts.tolist() == [100] * 9

    def test_every_op_group_drawn(self) -> None:
        aug, g = DSA(), _gen(2)
        seen = {aug.sample(1, g)["op"] for _ in range(200)}
        assert seen == set(DSA_OPS)

    def test_seed_determinism(self) -> None:
        aug = DSA(batchwise=False)
        for seed in range(5):
            assert _params_equal(aug.sample(8, _gen(seed)), aug.sample(8, _gen(seed)))
        draws = [aug.sample(8, _gen(seed)) for seed in range(5)]
        assert not all(_params_equal(draws[0], d) for d in draws[1:])
        x = _images(b=8)
        torch.testing.assert_close(aug(x, generator=_gen(7)), aug(x, generator=_gen(7)), rtol=0, atol=0)

    def test_global_rng_untouched(self) -> None:
        state = torch.get_rng_state()
        for aug in (DSA(), DSA(batchwise=False)):
            g = _gen(0)
            for _ in range(20):
                aug(_images(), generator=g)
        assert torch.equal(torch.get_rng_state(), state)

    @pytest.mark.parametrize("op", DSA_OPS)
    def test_batchwise_size_independent(self, op: str) -> None:
        aug = _dsa_single(op)
        p_big, p_small = aug.sample(256, _gen(4)), aug.sample(10, _gen(4))
        assert _params_equal(p_big, p_small)
        assert all(v.shape == (1,) for v in p_big.values() if isinstance(v, torch.Tensor))

    @pytest.mark.parametrize("op", DSA_OPS)
    def test_siamese_replay(self, op: str) -> None:
        aug = _dsa_single(op)
        x_syn, x_real = _images(b=2, h=8, w=8, seed=1), _images(b=5, h=8, w=8, seed=2)
        for seed in range(4):  # several draws, so flip is exercised both ways
            p = aug.sample(2, _gen(seed))
            joint = aug.apply(torch.cat([x_syn, x_real]), p)
            torch.testing.assert_close(joint[:2], aug.apply(x_syn, p), rtol=0, atol=1e-12)
            torch.testing.assert_close(joint[2:], aug.apply(x_real, p), rtol=0, atol=1e-12)
        if op in ("crop", "scale", "rotate"):
            # One transform for all images: the same image twice stays identical.
            out = aug.apply(torch.cat([x_syn[:1], x_syn[:1]]), aug.sample(2, _gen(0)))
            torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)

    def test_per_image_params_differ(self) -> None:
        p = _dsa_single("rotate", batchwise=False).sample(6, _gen())
        assert p["angle"].shape == (6,) and p["angle"].unique().numel() == 6
        with pytest.raises(ValueError, match="batch size"):
            _dsa_single("rotate", batchwise=False).apply(_images(b=4), p)

    @pytest.mark.parametrize("op", DSA_OPS)
    def test_gradient_reaches_images(self, op: str) -> None:
        x = _images(b=2, h=8, w=8).requires_grad_()
        aug = _dsa_single(op)
        (grad,) = torch.autograd.grad(aug(x, generator=_gen()).pow(2).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    def test_torch_func_grad(self) -> None:
        aug = DSA()
        p = aug.sample(1, _gen(0))
        x = _images(b=2)
        grad = torch.func.grad(lambda t: aug.apply(t, p).pow(2).sum())(x)
        (ref,) = torch.autograd.grad(aug.apply(x.requires_grad_(), p).pow(2).sum(), x)
        torch.testing.assert_close(grad, ref)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_cpu_generator_cuda_images(self) -> None:
        aug = DSA(batchwise=False)
        x = _images(b=4, h=8, w=8, dtype=torch.float32)
        for seed in range(6):
            p = aug.sample(4, _gen(seed), device="cuda")
            torch.testing.assert_close(aug.apply(x.cuda(), p).cpu(), aug.apply(x, aug.sample(4, _gen(seed))))


# --- KRRAugment ----------------------------------------------------------------------------------------------------


class TestKRRAugment:
    def test_smoke(self) -> None:
        aug = KRRAugment()
        assert list(aug.parameters()) == []
        assert aug.ops == KRR_OPS
        assert "flip" not in KRRAugment(ops="color_crop_rotate_translate_cutout").ops

    def test_exception_unknown_op(self) -> None:
        with pytest.raises(ValueError, match="known ops: flip, color, crop, rotate, translate, cutout"):
            KRRAugment(ops="flip_scale")
        with pytest.raises(ValueError, match="generator"):
            KRRAugment()(_images())
        p = KRRAugment().sample(3, _gen())
        with pytest.raises(ValueError, match="batch"):
            KRRAugment().apply(_images(b=4), p)

    @pytest.mark.parametrize("per_image_op", [False, True])
    def test_cardinality_and_op_choice(self, per_image_op: bool) -> None:
        aug = KRRAugment(per_image_op=per_image_op)
        x = _images(b=16, h=8, w=8, dtype=torch.float32)
        p = aug.sample(16, _gen(5))
        assert p["op"].shape == (16,)
        assert (p["op"].unique().numel() == 1) is not per_image_op
        out = aug.apply(x, p)
        assert out.shape == x.shape and out.dtype == x.dtype

    def test_per_image_op_matches_single_ops(self) -> None:
        # Each image must receive exactly the op (and params) chosen for it, as if augmented alone.
        aug = KRRAugment(per_image_op=True)
        x = _images(b=12, h=8, w=8)
        p = aug.sample(12, _gen(6))
        out = aug.apply(x, p)
        for i in range(12):
            p_i = {k: v[i : i + 1] for k, v in p.items()}
            torch.testing.assert_close(out[i : i + 1], aug.apply(x[i : i + 1], p_i), rtol=0, atol=1e-12)

    @pytest.mark.parametrize("name", KRR_OPS)
    def test_each_op_changes_images(self, name: str) -> None:
        aug = KRRAugment(ops=name)
        x = _images(b=4, h=8, w=8)
        p = aug.sample(4, _gen(1))
        if name == "flip":
            p["flip"] = torch.ones(4, dtype=torch.bool)  # a draw of four "no flip"s would be the identity
        assert (p["op"] == 0).all()
        assert not torch.allclose(aug.apply(x, p), x)

    def test_crop_window_right_half(self) -> None:
        # Zoom 2 with the window pushed fully right shows the right half of the image, magnified.
        x = torch.zeros(1, 1, 9, 9, dtype=F64)
        x[..., 4:] = 1.0
        p = {
            "op": torch.tensor([0]),
            "zoom": torch.tensor([2.0]),
            "crop_x": torch.tensor([1.0]),
            "crop_y": torch.zeros(1),
        }
        out = KRRAugment(ops="crop").apply(x, p)
        torch.testing.assert_close(out, torch.ones_like(out))

    def test_seed_and_global_rng(self) -> None:
        aug = KRRAugment(per_image_op=True)
        state = torch.get_rng_state()
        assert _params_equal(aug.sample(8, _gen(1)), aug.sample(8, _gen(1)))
        assert not _params_equal(aug.sample(8, _gen(1)), aug.sample(8, _gen(2)))
        aug(_images(b=8), generator=_gen(3))
        assert torch.equal(torch.get_rng_state(), state)

    def test_gradient_reaches_images(self) -> None:
        aug = KRRAugment(per_image_op=True)
        x = _images(b=12, h=8, w=8).requires_grad_()
        (grad,) = torch.autograd.grad(aug(x, generator=_gen()).pow(2).sum(), x)
        assert torch.isfinite(grad).all() and (grad.abs().sum(dim=(1, 2, 3)) > 0).all()

    def test_gradcheck_per_image_op(self) -> None:
        aug = KRRAugment(per_image_op=True)
        p = aug.sample(6, _gen(8))
        x = _images(b=6, c=1, h=4, w=4).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))
