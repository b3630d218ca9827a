"""Receptive-field arithmetic: the paper's sizes, and analytic boxes equal to gradient support.

The empirical side back-propagates through a linearised copy of each model, whose input
gradient is non-zero exactly on each output cell's receptive field.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from patchscope.common.errors import InputError
from patchscope.forensics.models import LayerGeometry, build_model
from patchscope.forensics.receptive import (ReceptiveField, cell_box, cell_for_pixel, min_input_size, output_size,
                                 patch_boxes, read_extent, receptive_field)

# The specification: receptive fields measured with the public code (REFERENCE.md §1).
PAPER_RECEPTIVE_FIELDS = {
    "xception_block1": 19, "xception_block2": 43, "xception_block3": 91,
    "xception_block4": 187, "xception_block5": 283, "resnet18_layer1": 43,
}


@pytest.mark.parametrize("name, size", sorted(PAPER_RECEPTIVE_FIELDS.items()))
def test_receptive_field_size_matches_the_paper(name, size):
    assert receptive_field(name).size == size


def test_single_layers_give_textbook_fields():
    assert receptive_field([LayerGeometry(3, 1, 1)]) == ReceptiveField(size=3, jump=1, start=0.0)
    # An even kernel centres its cells between pixels.
    assert receptive_field([LayerGeometry(2, 2, 0)]) == ReceptiveField(size=2, jump=2, start=0.5)
    # Dilation widens the window without changing the stride.
    assert receptive_field([LayerGeometry(3, 1, 2, dilation=2)]) == ReceptiveField(size=5, jump=1, start=0.0)
    # Two stride-2 3x3 layers: the second layer's window spans 3 cells of jump 2.
    stacked = [LayerGeometry(3, 2, 1), LayerGeometry(3, 2, 1)]
    assert receptive_field(stacked) == ReceptiveField(size=7, jump=4, start=0.0)


def test_a_model_and_its_name_give_the_same_field():
    for name in ("xception_block2", "resnet50_layer2"):
        assert receptive_field(build_model(name)) == receptive_field(name)


@pytest.mark.parametrize("name, sizes", [
    ("xception_block1", [7, 31, 48, 65]),
    ("xception_block3", [7, 40, 77]),
    ("resnet18_layer1", [1, 33, 50]),
    ("resnet50_layer2", [9, 64, 99]),
])
def test_output_size_matches_a_forward_pass(name, sizes):
    model = build_model(name, seed=0).eval()
    with torch.no_grad():
        for side in sizes:
            logits = model(torch.zeros(1, 3, side, side))
            assert logits.shape[-2:] == (output_size(name, side), output_size(name, side)), side


def test_too_small_input_is_refused_with_the_size_it_needs():
    needed = min_input_size("xception_block1")
    with torch.no_grad():
        assert build_model("xception_block1").eval()(torch.zeros(1, 3, needed, needed)).shape[-1] == 1
    assert output_size("xception_block1", needed) == 1
    with pytest.raises(InputError, match=rf"{needed - 1} px is too small for xception_block1: "
                                         rf"it needs at least {needed} px"):
        output_size("xception_block1", needed - 1)


def test_patch_boxes_cover_every_output_cell_and_agree_with_cell_box():
    rf = receptive_field("xception_block2")
    extent = read_extent("xception_block2", (64, 81))
    for clip in (True, False):
        boxes = patch_boxes("xception_block2", (64, 81), clip=clip)
        assert boxes.shape == (output_size("xception_block2", 64), output_size("xception_block2", 81), 4)
        assert boxes.dtype == np.int64
        for row in range(boxes.shape[0]):
            for col in range(boxes.shape[1]):
                assert tuple(boxes[row, col]) == cell_box(rf, row, col, extent, clip=clip)


def test_xception_drops_the_last_pixel_row_of_even_inputs_and_resnet_reads_all():
    # Xception's first conv is unpadded with stride 2: an even side leaves one pixel without a window.
    assert read_extent("xception_block1", (48, 49)) == (47, 49)
    assert read_extent("xception_block3", 299) == (299, 299)
    assert read_extent("resnet18_layer1", (48, 49)) == (48, 49)
    with pytest.raises(InputError, match="too small for xception_block2"):
        read_extent("xception_block2", (5, 64))


def test_unclipped_boxes_have_the_receptive_field_side_and_step_by_the_jump():
    rf = receptive_field("resnet18_layer1")
    boxes = patch_boxes("resnet18_layer1", 96, clip=False)
    assert np.all(boxes[..., 2] - boxes[..., 0] == rf.size)
    assert np.all(boxes[..., 3] - boxes[..., 1] == rf.size)
    assert np.all(np.diff(boxes[..., 0], axis=0) == rf.jump)
    assert np.all(np.diff(boxes[..., 1], axis=1) == rf.jump)
    # The box is centred on the cell's centre.
    assert np.all(boxes[..., 0] + (rf.size - 1) / 2 == rf.start + rf.jump * np.arange(boxes.shape[0])[:, None])


def test_interior_boxes_are_full_and_border_boxes_are_clipped_to_the_image():
    rf, side = receptive_field("xception_block2"), 97
    boxes = patch_boxes("xception_block2", side)
    unclipped = patch_boxes("xception_block2", side, clip=False)
    inside = np.all((unclipped[..., :2] >= 0) & (unclipped[..., 2:] <= side), axis=-1)
    assert inside.any() and not inside.all()
    assert np.array_equal(boxes[inside], unclipped[inside])
    assert np.all(boxes[inside][:, 2:] - boxes[inside][:, :2] == rf.size)
    assert np.all((boxes >= 0) & (boxes <= side))
    last = boxes.shape[0] - 1
    top, left, bottom, right = boxes[0, 0]
    assert (top, left) == (0, 0) and bottom < rf.size and right < rf.size
    assert tuple(boxes[last, last, 2:]) == (side, side)


def test_cell_for_pixel_inverts_the_cell_centres_and_clamps_at_the_border():
    name, side = "xception_block1", 48
    rf, cells = receptive_field(name), output_size(name, 48)
    for row in range(cells):
        for col in range(cells):
            centre_y, centre_x = rf.start + row * rf.jump, rf.start + col * rf.jump
            assert cell_for_pixel(name, centre_y, centre_x, side) == (row, col)
            # Anything less than half a jump away still maps to the same cell.
            assert cell_for_pixel(name, centre_y - rf.jump / 2 + 1, centre_x + rf.jump / 2 - 1, side) == (row, col)
    assert cell_for_pixel(name, 0, side - 1, side) == (0, cells - 1)
    assert cell_for_pixel(name, side - 1, 0, side) == (cells - 1, 0)


def _linearised(model: nn.Module) -> nn.Module:
    """A copy whose input gradient is positive exactly on each output cell's receptive field.

    Max-pooling and ReLU would zero the gradient of some pixels; averaging, identities and
    positive weights keep every path alive and no two paths can cancel.
    """
    probe = copy.deepcopy(model).eval().double()
    for parent in list(probe.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                         count_include_pad=True))
            elif isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Identity())
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()
    return probe.requires_grad_(False)


def _gradient_supports(name: str, side: int, cells: list[tuple[int, int]]) -> np.ndarray:
    """Per cell, the boolean mask of input pixels with a non-zero gradient; one backward pass for all."""
    probe = _linearised(build_model(name, seed=0))
    image = torch.ones(len(cells), 3, side, side, dtype=torch.float64, requires_grad=True)
    logits = probe(image)
    # Each batch item keeps its own cell: eval-mode layers never mix items.
    picked = torch.stack([logits[i, 1, row, col] for i, (row, col) in enumerate(cells)])
    picked.sum().backward()
    return (image.grad.abs().sum(dim=1) > 0).numpy()


@pytest.mark.parametrize("name, side", [
    ("xception_block1", 48),
    ("xception_block2", 65),
    ("xception_block3", 128),
    ("xception_block4", 200),
    ("resnet18_layer1", 64),
    ("resnet50_layer1", 61),
    ("resnet18_layer2", 128),
])
def test_patch_box_is_exactly_the_gradient_support(name, side):
    rf, last = receptive_field(name), output_size(name, side) - 1
    middle = last // 2
    cells = [(0, 0), (0, middle), (middle, last), (middle, middle), (last, last)]
    unclipped = [cell_box(rf, row, col, side, clip=False) for row, col in cells]
    # The cells must include at least one box fully inside the image and one cut by the border.
    assert any(t >= 0 and l >= 0 and b <= side and r <= side for t, l, b, r in unclipped)
    assert any(t < 0 or l < 0 or b > side or r > side for t, l, b, r in unclipped)
    boxes = patch_boxes(name, side)
    for (row, col), support in zip(cells, _gradient_supports(name, side, cells)):
        top, left, bottom, right = boxes[row, col]
        rows, cols = np.nonzero(support)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (top, left, bottom, right), (row, col)
        expected = np.zeros_like(support)
        expected[top:bottom, left:right] = True
        assert np.array_equal(support, expected), (row, col)


@pytest.mark.parametrize("name, side", [("xception_block1", 48), ("xception_block1", 49), ("resnet18_layer1", 48)])
def test_read_extent_is_where_the_gradient_of_the_whole_map_ends(name, side):
    probe = _linearised(build_model(name, seed=0))
    image = torch.ones(1, 3, side, side, dtype=torch.float64, requires_grad=True)
    probe(image)[:, 1].sum().backward()
    rows, cols = np.nonzero(image.grad[0].sum(dim=0).numpy() > 0)
    assert (rows.max() + 1, cols.max() + 1) == read_extent(name, side)
