"""Training augmentation of uint8 images, drawn per item: Wang et al.'s blur + JPEG, random resized crops, flips.

Used by `forensics.data.RealFakeDataset` for training items (validation, evaluation and the analysis never
augment). Every draw comes from generators seeded by (seed, epoch, index) alone, so an item is the same in
whichever worker, batch or resumed run it is built.

Wang et al. ("CNN-generated images are surprisingly easy to spot... for now", CVPR 2020) blur each training
image with probability p by a Gaussian of sigma ~ U[0, 3] px, then JPEG-compress it with probability p at a
quality ~ U{30, ..., 100}, on the image as loaded and before the crop; "Blur+JPEG (0.1)" and "(0.5)" are
p = 0.1 and 0.5, the presets below. Blur and JPEG are `forensics.perturb`'s, the same functions the
test-time robustness sweep applies (scipy's Gaussian cut at 4 sigma, Pillow's JPEG with 4:2:0 chroma).
Both run per image on the CPU where the image is decoded: JPEG has no device implementation, and the blur
must come before it in Wang et al.'s order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from patchscope.forensics.perturb import blur, jpeg

BLUR_SIGMA = (0.0, 3.0)    # sigma ~ U[0, 3] px
JPEG_QUALITY = (30, 100)   # quality ~ U{30, ..., 100}, both ends included
PRESETS = {"none": 0.0, "blur_jpeg_0.1": 0.1, "blur_jpeg_0.5": 0.5}  # name -> p for blur and for JPEG
RESIZED_CROP_SCALE = (0.08, 1.0)  # share of the image's area (torchvision RandomResizedCrop's defaults)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # width / height
_RESIZED_CROP_TRIES = 10


def preset_probability(preset: str) -> float:
    """The blur and JPEG probability of a named preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def degradation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The blur/JPEG draws of one item: a stream of their own, so crops and flips draw as without them."""
    return np.random.default_rng([seed, epoch, index, 1])


@dataclass(frozen=True)
class Augmentation:
    """What a training item goes through besides its crop: see the module doc."""

    blur_prob: float = 0.0              # P(Gaussian blur, sigma ~ U[0, 3])
    jpeg_prob: float = 0.0              # P(JPEG, quality ~ U{30..100})
    random_resized_crop: bool = False   # a random area and aspect resized to the crop, instead of a plain window
    flip: bool = True                   # a coin-flip horizontal mirror

    @property
    def degrades(self) -> bool:
        """Whether blur or JPEG may be applied at all (with both at 0 the pixels are never touched)."""
        return self.blur_prob > 0 or self.jpeg_prob > 0

    def degrade(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blur, then JPEG, each with its probability. All four draws are made whatever the probabilities, so a
        change of p changes which items are degraded, never the sigma or quality an item draws."""
        blur_draw, sigma = rng.random(), rng.uniform(*BLUR_SIGMA)
        jpeg_draw, quality = rng.random(), int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        if blur_draw < self.blur_prob:
            pixels = blur(pixels, sigma)
        if jpeg_draw < self.jpeg_prob:
            pixels = jpeg(pixels, quality)
        return pixels


def resized_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of a random resized crop: an area share and a log-uniform aspect, tried
    a few times; when none fits, the centred box of the nearest allowed aspect."""
    area = height * width
    for _ in range(_RESIZED_CROP_TRIES):
        target = area * rng.uniform(*RESIZED_CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])))
        box_w, box_h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < box_w <= width and 0 < box_h <= height:
            return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)), box_h, box_w
    ratio = width / height
    if ratio < RESIZED_CROP_RATIO[0]:
        box_w, box_h = width, int(round(width / RESIZED_CROP_RATIO[0]))
    elif ratio > RESIZED_CROP_RATIO[1]:
        box_w, box_h = int(round(height * RESIZED_CROP_RATIO[1])), height
    else:
        box_w, box_h = width, height
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def random_resized_crop(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop of a uint8 H x W x 3 image, resized (bilinear) to size x size."""
    top, left, box_h, box_w = resized_crop_box(pixels.shape[0], pixels.shape[1], rng)
    box = np.ascontiguousarray(pixels[top:top + box_h, left:left + box_w])
    if box.shape[:2] == (size, size):
        return box
    return np.asarray(Image.fromarray(box).resize((size, size), Image.BILINEAR), dtype=np.uint8)
