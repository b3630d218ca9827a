"""Tiny random generators shared by the attack and analysis tests."""
from __future__ import annotations

from pathlib import Path

import torch

from patchscope.generators.pgan.zoo import build_pgan_zoo, save_pgan_zoo

RESOLUTION = 16
LATENT_DIM = 8


def tiny_pgan(seed: int = 0):
    """A 16 px zoo PGAN and its discriminator, random weights seeded by `seed`."""
    torch.manual_seed(seed)
    generator, discriminator = build_pgan_zoo(RESOLUTION, latent_dim=LATENT_DIM, depth_scale0=16,
                                              depth_other_scales=(16, 16))
    # A random PGAN saturates far beyond [-1, 1]; a quieter toRGB keeps its images in range.
    generator.toRGBLayers[-1].module.weight.data.mul_(0.2)
    return generator.eval(), discriminator


def save_tiny_pgan(path: Path, seed: int) -> Path:
    generator, discriminator = tiny_pgan(seed)
    return save_pgan_zoo(generator, path, discriminator=discriminator)
