"""Receptive-field arithmetic for patch classifiers: output cell <-> input pixel box.

Used by training and evaluation (the smallest image a model accepts: its receptive field) and by the
analysis (heatmaps, most-predictive patches) to map logit-map cells to pixels; scoring does not need it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch

from patchscope.common.errors import InputError
from patchscope.forensics.models import LayerGeometry, PatchClassifier, build_model

# A model, a registered model name, or directly the layer list of a model's main path.
ModelLike = Union[PatchClassifier, str, Sequence[LayerGeometry]]
Size = Union[int, tuple[int, int]]  # a square side, or (height, width)


@dataclass(frozen=True)
class ReceptiveField:
    """Where the output cells of a fully convolutional stack look in its input.

    Coordinates are pixel indices (pixel i is centred at i). Cell k along an axis is
    centred at `start + k * jump` and sees `size` pixels around that centre, some of
    which may lie in the padding outside the image.
    """

    size: int     # pixels seen by one output cell, along one axis
    jump: int     # pixels between the centres of neighbouring output cells
    start: float  # centre of output cell 0; a half-integer when `size` is even

    @property
    def first_edge(self) -> int:
        """Index of the first pixel seen by cell 0 (negative when it starts in the padding)."""
        return round(self.start - (self.size - 1) / 2)


def _layers(model: ModelLike) -> tuple[LayerGeometry, ...]:
    if isinstance(model, str):
        return _registered_layers(model)
    if isinstance(model, PatchClassifier):
        return tuple(model.geometry())
    return tuple(model)


@lru_cache(maxsize=None)
def _registered_layers(name: str) -> tuple[LayerGeometry, ...]:
    # Only the layer shapes matter, so skip allocating (and initialising) any weights.
    with torch.device("meta"):
        return tuple(build_model(name).geometry())


def _cumulative_fields(layers: Sequence[LayerGeometry]) -> list[ReceptiveField]:
    """The receptive field of the map after each layer, in input pixels."""
    size, jump, first_edge = 1, 1, 0
    fields = []
    for layer in layers:
        # The window of output cell 0 starts `padding` cells before input cell 0.
        first_edge -= layer.padding * jump
        size += layer.dilation * (layer.kernel - 1) * jump
        jump *= layer.stride
        fields.append(ReceptiveField(size=size, jump=jump, start=first_edge + (size - 1) / 2))
    return fields


def receptive_field(model: ModelLike) -> ReceptiveField:
    """Size, jump and first centre of the receptive field of every output cell, from the layer list."""
    fields = _cumulative_fields(_layers(model))
    return fields[-1] if fields else ReceptiveField(size=1, jump=1, start=0.0)


def _next_side(layer: LayerGeometry, side: int) -> int:
    return (side + 2 * layer.padding - layer.dilation * (layer.kernel - 1) - 1) // layer.stride + 1


def _output_side(layers: Sequence[LayerGeometry], side: int) -> int:
    for layer in layers:
        side = _next_side(layer, side)
        if side < 1:
            return 0
    return side


def _read_side(layers: Sequence[LayerGeometry], side: int) -> int:
    extent, cells = side, side
    for layer, field in zip(layers, _cumulative_fields(layers)):
        cells = _next_side(layer, cells)
        if cells < 1:
            return 0
        # A strided window that does not fit is dropped, and with it the last pixels it would have read.
        extent = min(extent, field.first_edge + (cells - 1) * field.jump + field.size)
    return extent


def min_input_size(model: ModelLike) -> int:
    """Smallest square input side that gives at least one output cell."""
    layers = _layers(model)
    side = 1
    while _output_side(layers, side) < 1:
        side += 1
    return side


def output_size(model: ModelLike, input_size: int) -> int:
    """Side of the logit map for a square input of `input_size` pixels."""
    layers = _layers(model)
    side = _output_side(layers, input_size)
    if side < 1:
        label = model if isinstance(model, str) else getattr(model, "name", "this model")
        raise InputError(f"an input of {input_size} px is too small for {label}: "
                         f"it needs at least {min_input_size(layers)} px")
    return side


def _height_width(input_size: Size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = input_size
    return int(height), int(width)


def read_extent(model: ModelLike, input_size: Size) -> tuple[int, int]:
    """(height, width) of the top-left region the model reads; pixels beyond it reach no output cell.

    It is the image size unless a strided layer drops a window that would overhang the
    image (Xception's unpadded first conv at even sizes drops the last row and column).
    """
    layers = _layers(model)
    height, width = _height_width(input_size)
    output_size(model, min(height, width))  # refuses inputs too small for any output
    return _read_side(layers, height), _read_side(layers, width)


def cell_box(rf: ReceptiveField, row: int, col: int, input_size: Size,
             clip: bool = True) -> tuple[int, int, int, int]:
    """Pixel box `(top, left, bottom, right)` seen by output cell (row, col); bottom/right exclusive.

    With `clip` the box is cut to `input_size`; without it, it may reach into the padding.
    Pass `read_extent(model, size)` as `input_size` to get exactly the pixels that influence
    the cell, as `patch_boxes` does.
    """
    height, width = _height_width(input_size)
    top = rf.first_edge + row * rf.jump
    left = rf.first_edge + col * rf.jump
    bottom, right = top + rf.size, left + rf.size
    if clip:
        top, left = max(top, 0), max(left, 0)
        bottom, right = min(bottom, height), min(right, width)
    return top, left, bottom, right


def patch_boxes(model: ModelLike, input_size: Size, clip: bool = True) -> np.ndarray:
    """Boxes of every output cell as an int64 array `[H', W', 4]` of (top, left, bottom, right).

    With `clip` each box holds exactly the pixels that influence its cell: cut to the image
    and to the region the model reads (`read_extent`).
    """
    height, width = _height_width(input_size)
    rf = receptive_field(model)
    firsts_y = rf.first_edge + rf.jump * np.arange(output_size(model, height), dtype=np.int64)
    firsts_x = rf.first_edge + rf.jump * np.arange(output_size(model, width), dtype=np.int64)
    top, left = np.meshgrid(firsts_y, firsts_x, indexing="ij")
    boxes = np.stack([top, left, top + rf.size, left + rf.size], axis=-1)
    if clip:
        read_height, read_width = read_extent(model, (height, width))
        np.clip(boxes[..., 0::2], 0, read_height, out=boxes[..., 0::2])
        np.clip(boxes[..., 1::2], 0, read_width, out=boxes[..., 1::2])
    return boxes


def cell_for_pixel(model: ModelLike, y: float, x: float, input_size: Size) -> tuple[int, int]:
    """The output cell whose receptive-field centre is nearest pixel (y, x); ties go to the later cell."""
    height, width = _height_width(input_size)
    rf = receptive_field(model)

    def nearest(coord: float, cells: int) -> int:
        index = math.floor((coord - rf.start) / rf.jump + 0.5)
        # Pixels near the border may be nearer a centre beyond the map; the edge cell still sees them.
        return min(max(index, 0), cells - 1)

    return nearest(y, output_size(model, height)), nearest(x, output_size(model, width))
