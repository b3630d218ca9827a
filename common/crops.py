"""Random square crops of photographs: the recipe the demo's built-in crops and `prepare --random-crops` share.

A crop is a square of random side between `size` and `max_scale` x `size` (never more than the photo's
shorter side) at a random position, Lanczos-resized to `size` and mirrored left-right with probability
one half. `draw_crop` makes the random draws (side, top, left, mirror, in that order) from a numpy
Generator, `cut_crop` applies a drawn box to the pixels; forensics.builtin_images and
generators.random_crops both go through these two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_MAX_SCALE = 3.0


@dataclass(frozen=True)
class CropBox:
    """A square of `side` px whose top-left corner is (left, top), in the upright photo's pixels."""

    left: int
    top: int
    side: int
    flipped: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), right and bottom exclusive (Pillow's crop box)."""
        return self.left, self.top, self.left + self.side, self.top + self.side

    def record(self) -> dict[str, Any]:
        return {"box": list(self.box), "flipped": self.flipped}


def largest_side(height: int, width: int, size: int, max_scale: float = DEFAULT_MAX_SCALE) -> int:
    """The largest square a crop may take: min(max_scale x size, height, width)."""
    return min(int(max_scale * size), height, width)


def draw_crop(rng: np.random.Generator, height: int, width: int, size: int,
              max_scale: float = DEFAULT_MAX_SCALE) -> CropBox:
    """One random crop of a height x width photo; ValueError if the photo is smaller than `size`."""
    if size < 1 or max_scale < 1:
        raise ValueError(f"need size >= 1 and max_scale >= 1, got {size} and {max_scale}")
    if min(height, width) < size:
        raise ValueError(f"a {width}x{height} photo is smaller than a {size} px crop")
    side = int(rng.integers(size, largest_side(height, width, size, max_scale) + 1))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    return CropBox(left, top, side, bool(rng.random() < 0.5))


def cut_crop(photo: np.ndarray, crop: CropBox, size: int) -> np.ndarray:
    """The uint8 size x size x 3 pixels of `crop` in `photo` (H x W x 3): cut, Lanczos to `size`, mirrored."""
    height, width = photo.shape[:2]
    if crop.left < 0 or crop.top < 0 or crop.left + crop.side > width or crop.top + crop.side > height:
        raise ValueError(f"crop box {crop.box} lies outside the {width}x{height} photo")
    image = Image.fromarray(photo[crop.top:crop.top + crop.side, crop.left:crop.left + crop.side])
    if crop.side != size:
        image = image.resize((size, size), Image.LANCZOS)
    array = np.asarray(image)
    return array[:, ::-1] if crop.flipped else array
