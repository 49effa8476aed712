"""The picture of a distilled set: readable at a glance (enlarged, labelled classes, learned labels shown)."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.viz import set_picture


def test_one_image_per_class_is_a_readable_row_not_a_strip():
    x = torch.rand(10, 1, 28, 28)
    pic = set_picture(x, torch.arange(10), 1, class_names=[f"class {c}" for c in range(10)])
    assert pic.shape[0] == 3 and pic.min() >= 0 and pic.max() <= 1
    _, h, w = pic.shape
    assert w >= 10 * 80 and h >= 80  # each 28 px digit drawn at about 100 px, side by side


def test_learned_labels_are_drawn_beside_their_images():
    x = torch.rand(20, 1, 28, 28)
    hard = set_picture(x, torch.arange(10).repeat_interleave(2), 2)
    learned = set_picture(x, torch.randn(20, 10), 2)
    assert learned.shape[1] > hard.shape[1] * 1.2  # a bar chart under every image
    # the own-class bar is orange: some pixels are strongly orange (R high, B low)
    r, g, b = learned
    assert ((r > 0.9) & (b < 0.3) & (g > 0.4)).sum() > 50
    r, g, b = hard
    assert ((r > 0.9) & (b < 0.3) & (g > 0.4)).sum() == 0


def test_many_classes_are_capped_and_said_so():
    x = torch.rand(100, 3, 8, 8)
    pic = set_picture(x, torch.arange(100), 1, max_classes=20)
    assert pic.shape[2] < 20 * 120  # only 20 columns drawn


def test_images_must_split_into_classes():
    with pytest.raises(ValueError, match="images_per_class"):
        set_picture(torch.rand(7, 1, 4, 4), torch.arange(7), 2)
