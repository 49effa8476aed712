"""Contract tests for the network registry: every registered net gets the same battery (the timm idea)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lightning_distill.nets import ConvNet, get_net, list_nets, register_net
from lightning_distill.nets import registry as registry_module
from lightning_distill.nets.registry import _REGISTRY

NUM_CLASSES = 5
SHAPES = [(1, 28), (3, 32), (3, 64)]
# Small widths keep the whole file fast on 2 CPU cores; nets without a `width` option are small already.
SMALL_WIDTH = 8


def _build(name: str, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    try:
        return get_net(name, in_channels, NUM_CLASSES, image_size, width=SMALL_WIDTH, **kwargs)
    except TypeError:  # the net has no `width` option
        return get_net(name, in_channels, NUM_CLASSES, image_size, **kwargs)


def _input(in_channels: int, image_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_channels, image_size, image_size, generator=g)


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", list_nets())
def test_output_and_feature_shapes(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    net = _build(name, in_channels, image_size)
    x = _input(in_channels, image_size)
    assert isinstance(net.feature_dim, int)
    assert net(x).shape == (2, NUM_CLASSES)
    assert net(x, features_only=True).shape == (2, net.feature_dim)


@pytest.mark.parametrize("name", list_nets())
def test_functional_call_matches_plain_call(name: str) -> None:
    torch.manual_seed(0)
    net = _build(name, 3, 32).eval()
    x = _input(3, 32)
    params = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    torch.testing.assert_close(functional_call(net, params, (x,)), net(x))
    torch.testing.assert_close(functional_call(net, params, (x,), {"features_only": True}), net(x, features_only=True))
    # Parameters passed in really are used: zeroing them changes the output.
    zeros = {k: torch.zeros_like(v) if k in dict(net.named_parameters()) else v for k, v in params.items()}
    assert not torch.allclose(functional_call(net, zeros, (x,)), net(x))


@pytest.mark.parametrize("name", list_nets())
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    net = _build(name, 1, 28).train()
    x = _input(1, 28, batch=4)
    loss = F.cross_entropy(net(x), torch.arange(4) % NUM_CLASSES)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(_REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_net("convnet")(ConvNet)
    register_net("test_only_net")(ConvNet)
    assert "test_only_net" in registry_module.list_nets()
    with pytest.raises(ValueError, match="already registered"):
        register_net("test_only_net")(ConvNet)


def test_unknown_name_lists_known_nets() -> None:
    with pytest.raises(ValueError, match="convnet") as info:
        get_net("no_such_net", 3, 10, 32)
    assert "resnet18" in str(info.value)


def test_expected_builtin_names_and_dc_feature_dims() -> None:
    assert {"convnet", "convnet_frepo", "convnet_rcig", "alexnet", "vgg11", "resnet18", "lenet", "mlp"} <= set(
        list_nets()
    )
    # Full-width DC ConvNet: 128 * 4 * 4 at 28 (padded to 32) and 32 px; depth 4 at 64 px keeps 4 x 4.
    for in_channels, image_size in SHAPES:
        net = get_net("convnet", in_channels, 10, image_size)
        assert net.feature_dim == 2048
    # 28 px: the first conv pads by 3, so the net sees 32 px.
    assert get_net("convnet", 1, 10, 28).blocks[0][0].padding == (3, 3)
    assert get_net("convnet", 3, 10, 32).blocks[0][0].padding == (1, 1)
    assert len(get_net("convnet", 3, 10, 64).blocks) == 4
    assert len(get_net("convnet", 3, 10, 128).blocks) == 5


def test_frepo_doubling_widths_give_8192_features() -> None:
    net = ConvNet(3, 10, 32, width=128, depth=3, double_width=True)
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [128, 256, 512]
    assert net.feature_dim == 512 * 4 * 4 == 8192
    assert get_net("convnet_frepo", 1, 10, 28).feature_dim == 8192
    assert get_net("convnet_frepo", 3, 10, 64, width=4).feature_dim == 4 * 8 * 4 * 4


def test_norm_before_conv_only_in_later_blocks() -> None:
    net = get_net("convnet_frepo", 3, 10, 32, width=4)
    first_types = [type(block[0]) for block in net.blocks]
    assert first_types == [nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm2d]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.blocks[0]) == 0
    # Each BN normalises the previous block's output channels and precedes exactly one conv.
    assert [block[0].num_features for block in net.blocks[1:]] == [4, 8]
    assert all(block[0].momentum == 0.9 for block in net.blocks[1:])
    # Evaluation (krr protocol) net: no norm at all.
    eval_net = get_net("convnet_frepo", 3, 10, 32, width=4, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in eval_net.modules())
    # DC order (norm after conv) for comparison.
    dc = ConvNet(3, 10, 32, width=4, norm="batch")
    assert [type(m) for m in dc.blocks[0]][:2] == [nn.Conv2d, nn.BatchNorm2d]


def test_softplus_beta() -> None:
    net = get_net("convnet_rcig", 3, 10, 32, width=4)
    acts = [m for m in net.modules() if isinstance(m, nn.Softplus)]
    assert len(acts) == 3 and all(a.beta == 60.0 for a in acts)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in net.modules())
    z = torch.linspace(-0.2, 0.2, 41)
    torch.testing.assert_close(acts[0](z), F.softplus(60.0 * z) / 60.0)
    # A smooth ReLU: close to relu away from 0.
    assert (acts[0](z) - z.clamp(min=0)).abs().max() <= math.log(2) / 60 + 1e-6
    # Depth 4 (64 px) uses ReLU, and RCIG's evaluation net is the same with activation="relu".
    assert not any(isinstance(m, nn.Softplus) for m in get_net("convnet_rcig", 3, 10, 64, width=4).modules())
    relu_net = get_net("convnet_rcig", 3, 10, 32, width=4, activation="relu")
    assert not any(isinstance(m, nn.Softplus) for m in relu_net.modules())


def test_lecun_init_statistics() -> None:
    torch.manual_seed(0)
    net = ConvNet(3, 10, 32, width=64, depth=3, norm="none", init="lecun")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            target = 1.0 / math.sqrt(fan_in)
            w = m.weight.detach()
            assert abs(w.std().item() / target - 1) < 0.05, (m, w.std().item(), target)
            assert abs(w.mean().item()) < 0.05 * target
            # Truncation at two (pre-truncation) standard deviations.
            assert w.abs().max() <= 2 * target / 0.87962566103423978 + 1e-6
            assert torch.count_nonzero(m.bias) == 0
    # PyTorch's default init is different (Kaiming-uniform, a = sqrt(5): std = 1 / sqrt(3 fan_in)).
    torch.manual_seed(0)
    default = ConvNet(3, 10, 32, width=64, depth=3, norm="none")
    conv = default.blocks[1][0]
    assert abs(conv.weight.std().item() * math.sqrt(3 * conv.weight[0].numel()) - 1) < 0.05


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError):
        ConvNet(3, 10, 32, norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConvNet(3, 10, 32, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ConvNet(3, 10, 32, pooling="sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling,feature_dim", [("max", 4 * 4 * 4), ("none", 4 * 32 * 32)])
def test_convnet_pooling_options(pooling: str, feature_dim: int) -> None:
    net = ConvNet(3, 10, 32, width=4, depth=3, pooling=pooling)  # type: ignore[arg-type]
    assert net.feature_dim == feature_dim
    assert net(_input(3, 32), features_only=True).shape == (2, feature_dim)


def test_vmap_over_stacked_instance_norm_convnets() -> None:
    torch.manual_seed(0)
    nets = [ConvNet(3, NUM_CLASSES, 32, width=8) for _ in range(3)]
    params, buffers = stack_module_state(nets)
    base = ConvNet(3, NUM_CLASSES, 32, width=8).to("meta")
    x = _input(3, 32, batch=4)

    def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (inp,), {"features_only": True})

    batched = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    looped = torch.stack([net(x, features_only=True) for net in nets])
    torch.testing.assert_close(batched, looped)
