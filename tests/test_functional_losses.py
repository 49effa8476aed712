"""Label conventions and losses, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.functional import centred_one_hot, frepo_label_init_scale, half_mse, label_margin_loss


def test_centred_one_hot_by_hand():
    out = centred_one_hot(torch.tensor([0, 2]), 3)
    expected = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.zeros(2))


def test_centred_one_hot_scale_and_dtype():
    out = centred_one_hot(torch.tensor([1]), 4, scale=0.5, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([[-0.125, 0.375, -0.125, -0.125]], dtype=torch.float64))


def test_frepo_label_init_scale():
    assert frepo_label_init_scale(10) == pytest.approx(1.0)
    assert frepo_label_init_scale(100) == pytest.approx(1 / math.sqrt(10))
    assert frepo_label_init_scale(200) == pytest.approx(1 / math.sqrt(20))
    assert frepo_label_init_scale(1000) == pytest.approx(0.1)


def test_label_margin_loss_by_hand():
    # Row 0: margin 0.4 is capped at 1/3; row 1: margin 0.01 is below the cap.
    y = torch.tensor([[0.5, 0.1, 0.0], [0.2, 0.0, 0.19]], dtype=torch.float64, requires_grad=True)
    loss = label_margin_loss(y)  # margin defaults to 1/C = 1/3
    assert loss.item() == pytest.approx(-(1 / 3 + 0.01) / 2)
    (grad,) = torch.autograd.grad(loss, y)
    expected = torch.tensor([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_label_margin_loss_explicit_margin():
    y = torch.tensor([[0.5, 0.1, 0.0]])
    assert label_margin_loss(y, margin=1.0).item() == pytest.approx(-0.4)
    with pytest.raises(ValueError):
        label_margin_loss(torch.ones(3, 1))


def test_half_mse_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # Row errors: ½(1 + 4) = 2.5 and ½(1 + 1) = 1; mean 1.75.
    assert half_mse(pred, target).item() == pytest.approx(1.75)
    with pytest.raises(ValueError):
        half_mse(pred, target[:1])
