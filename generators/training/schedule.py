"""What progressive GAN training shows at each step: channel depths per scale, the alpha fade-in,
the batch order, and the random draws of a step, all derived from (seed, scale, step) alone.

Used by `generators.training.trainer`; deriving every draw from counters is what makes a resumed run
repeat an uninterrupted one exactly without saving any RNG state.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

# Purposes of derived seeds, so that no two streams coincide.
INIT, ORDER, STEP = 0, 1, 2


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (a NumPy SeedSequence hash)."""
    high, low = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(high) << 31 | int(low) >> 1) & (2**63 - 1)


def scale_resolutions(resolution: int) -> list[int]:
    """4, 8, ... resolution: the scales progressive growing goes through."""
    count = int(math.log2(resolution)) - 1 if resolution >= 4 else 0
    if count < 1 or 2 ** (count + 1) != resolution:
        raise ValueError(f"resolution must be a power of two >= 4, not {resolution}")
    return [4 * 2**i for i in range(count)]


def scale_depths(resolution: int, fmap_base: int, fmap_max: int) -> list[int]:
    """Channels of each scale, Karras et al.'s rule `min(fmap_max, fmap_base / r)` at r px
    (fmap_base 16384, fmap_max 512 give pytorch_GAN_zoo's celebAHQ depths)."""
    return [max(1, min(fmap_max, fmap_base // r)) for r in scale_resolutions(resolution)]


def fade_alpha(scale: int, images_at_scale: int, fade_images: int) -> float:
    """Weight of the previous scale's upsampled output: 1 when a scale is added, falling linearly
    to 0 after `fade_images` images; always 0 at the first scale, which has nothing to fade from."""
    if scale == 0 or fade_images <= 0:
        return 0.0
    return max(0.0, 1.0 - images_at_scale / fade_images)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, scale: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the `n` images in one epoch of one scale."""
    generator = torch.Generator().manual_seed(derive_seed(seed, ORDER, scale, epoch))
    return torch.randperm(n, generator=generator)


def batch_indices(n: int, batch_size: int, step: int, seed: int, scale: int) -> torch.Tensor:
    """Image indices of `step` at `scale`: the next `batch_size` of a stream of shuffled epochs."""
    parts, position = [], step * batch_size
    end = position + batch_size
    while position < end:
        epoch, offset = divmod(position, n)
        take = min(end - position, n - offset)
        parts.append(epoch_order(n, seed, scale, epoch)[offset:offset + take])
        position += take
    return torch.cat(parts)


@dataclass
class StepDraws:
    """The random numbers of one training step (drawn on the CPU, the same on every device)."""

    z_critic: torch.Tensor     # latents of the fakes the critic sees
    z_generator: torch.Tensor  # latents of the generator's own step
    mix: torch.Tensor          # gradient-penalty interpolation weights, N values in [0, 1)
    flip: torch.Tensor         # which real images are mirrored


def draw_step(seed: int, scale: int, step: int, batch_size: int, latent_dim: int) -> StepDraws:
    generator = torch.Generator().manual_seed(derive_seed(seed, STEP, scale, step))
    z_critic = torch.randn(batch_size, latent_dim, generator=generator)
    z_generator = torch.randn(batch_size, latent_dim, generator=generator)
    mix = torch.rand(batch_size, generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return StepDraws(z_critic, z_generator, mix, flip)
