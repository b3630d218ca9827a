"""Glow (Kingma & Dhariwal 2018): the multi-scale flow, its likelihood, and the sampling Generator.

Used by `generators.glow.y0ast` (loading), sampling and the attacks; layer names follow y0ast Glow-PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from patchscope.generators.base import Generator
from patchscope.generators.glow.layers import (FlowStep, SplitPrior, Squeeze, ZeroConv, gaussian_log_prob,
                                    split_halves)

COUPLINGS = ("additive", "affine")
PERMUTATIONS = ("invconv", "reverse")
DEFAULT_TEMPERATURE = 0.7  # what openai and the paper sample Glow at


@dataclass(frozen=True)
class GlowConfig:
    """Hyper-parameters that fix a Glow's layout (the defaults are y0ast's)."""

    resolution: int
    hidden_channels: int = 512
    steps: int = 32  # K: flow steps per level
    levels: int = 3  # L: squeeze scales; all but the last end with a split
    coupling: str = "affine"
    permutation: str = "invconv"
    lu_decomposed: bool = True
    learn_top: bool = True
    in_channels: int = 3
    n_bits: int = 8  # input quantisation; enters only the likelihood, not the weights

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, not {self.coupling!r}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, not {self.permutation!r}")
        if self.levels < 1 or self.steps < 1 or self.resolution % (2 ** self.levels):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2^levels "
                             f"(levels={self.levels}, steps={self.steps})")
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, not {self.n_bits}")

    @property
    def top_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the top latent: every level squeezes (x4 channels), every split halves."""
        side = self.resolution // 2 ** self.levels
        return self.in_channels * 2 ** (self.levels + 1), side, side

    @property
    def n_dims(self) -> int:
        return self.in_channels * self.resolution ** 2


def openai_celebahq_config() -> GlowConfig:
    """openai's CelebA-HQ 256 Glow: 6 levels x 32 steps, width 512, additive, plain 1x1, 5-bit input.

    In the y0ast layout; openai's own 3x3 convolutions also read an "edge" channel
    that marks padding, which this layout has no slot for.
    """
    return GlowConfig(resolution=256, hidden_channels=512, steps=32, levels=6, coupling="additive",
                      permutation="invconv", lu_decomposed=False, learn_top=True, in_channels=3,
                      n_bits=5)


def quantize_pixels(pixels: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Pixels in 0..255 -> Glow input: keep the top `n_bits` bits, scale to [-0.5, 0.5).

    `floor(p / 2^(8 - n_bits)) / 2^n_bits - 0.5`, as openai and y0ast pre-process.
    """
    bins = torch.floor(pixels.float() / 2 ** (8 - n_bits))
    return bins / 2 ** n_bits - 0.5


@dataclass
class SplitRecord:
    """One split on the way up: `z_in` = cat(z1, z2); z2 is factored out with prior N(mean, exp(logs)²)."""

    z_in: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    mean: torch.Tensor
    logs: torch.Tensor

    @property
    def eps(self) -> torch.Tensor:
        """z2 in prior-standardised units; `decode(..., eps=...)` puts it back exactly."""
        return (self.z2 - self.mean) * torch.exp(-self.logs)


@dataclass
class GlowEncoding:
    """Everything `Glow.encode` finds; per-image terms are shaped [N], splits go finest level first."""

    z_top: torch.Tensor
    logdet: torch.Tensor  # sum of log|det J| of all flow steps
    split_logp: torch.Tensor  # sum of log N(z2; split prior) over the levels
    top_logp: torch.Tensor  # log N(z_top; top prior)
    prior_mean: torch.Tensor
    prior_logs: torch.Tensor
    splits: list[SplitRecord]

    @property
    def logdet_plus_split_logp(self) -> torch.Tensor:
        return self.logdet + self.split_logp

    @property
    def log_density(self) -> torch.Tensor:
        """log p(x) of the continuous input, in nats."""
        return self.logdet + self.split_logp + self.top_logp

    @property
    def eps(self) -> list[torch.Tensor]:
        return [s.eps for s in self.splits]


class FlowLayers(nn.Module):
    """y0ast's `FlowNet` container: per level a squeeze, K flow steps, then a split (not on the last)."""

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        channels = config.in_channels
        for level in range(config.levels):
            channels *= 4
            self.layers.append(Squeeze())
            for _ in range(config.steps):
                self.layers.append(FlowStep(channels, config.hidden_channels, config.coupling,
                                            config.permutation, config.lu_decomposed))
            if level < config.levels - 1:
                self.layers.append(SplitPrior(channels))
                channels //= 2


class Glow(nn.Module):
    """The flow x <-> (z_top, split latents) in y0ast's space: x in [-0.5, 0.5), NCHW.

    State-dict keys equal y0ast's (`prior_h`, `flow.layers.N.…`, `learn_top_fn.…`).
    """

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.top_shape
        self.flow = FlowLayers(config)
        if config.learn_top:
            self.learn_top_fn = ZeroConv(2 * c, 2 * c)
        # A constant input whose image under learn_top_fn is (mean, logs) of the top prior.
        self.register_buffer("prior_h", torch.zeros(1, 2 * c, h, w))

    @property
    def n_splits(self) -> int:
        return self.config.levels - 1

    def top_prior(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logs) of the top latent, each [batch, C, H, W]."""
        h = self.learn_top_fn(self.prior_h) if self.config.learn_top else self.prior_h
        mean, logs = split_halves(h)
        return mean.expand(batch, -1, -1, -1), logs.expand(batch, -1, -1, -1)

    def encode(self, x: torch.Tensor) -> GlowEncoding:
        """Run the flow up from x (no dequantisation noise is added here)."""
        batch = x.shape[0]
        logdet = x.new_zeros(batch)
        split_logp = x.new_zeros(batch)
        splits: list[SplitRecord] = []
        z = x
        for layer in self.flow.layers:
            if isinstance(layer, FlowStep):
                z, step_logdet = layer(z)
                logdet = logdet + step_logdet
            elif isinstance(layer, SplitPrior):
                z1, z2 = split_halves(z)
                mean, logs = layer.prior(z1)
                split_logp = split_logp + gaussian_log_prob(z2, mean, logs)
                splits.append(SplitRecord(z, z1, z2, mean, logs))
                z = z1
            else:
                z = layer(z)
        mean, logs = self.top_prior(batch)
        return GlowEncoding(z, logdet, split_logp, gaussian_log_prob(z, mean, logs), mean, logs, splits)

    def decode(self, z_top: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
               eps: Sequence[torch.Tensor | None] | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the flow down from `z_top`; each split level's z2 comes from its prior.

        `eps[i]` (finest level first, as `GlowEncoding.eps`) gives level i exactly:
        `z2 = mean + exp(logs) * eps[i]`, temperature not applied. Levels without eps are
        sampled `mean + exp(logs) * temperature * N(0, 1)`; temperature 0 gives the means
        and draws no random numbers.
        """
        level_eps = list(eps) if eps is not None else [None] * self.n_splits
        if len(level_eps) != self.n_splits:
            raise ValueError(f"eps has {len(level_eps)} levels; this Glow has {self.n_splits} splits")
        level = self.n_splits
        z = z_top
        for layer in reversed(self.flow.layers):
            if isinstance(layer, SplitPrior):
                level -= 1
                mean, logs = layer.prior(z)
                noise = level_eps[level]
                if noise is None and temperature != 0:
                    noise = temperature * torch.randn(mean.shape, generator=generator, device=mean.device,
                                                      dtype=mean.dtype)
                z2 = mean if noise is None else mean + torch.exp(logs) * noise
                z = torch.cat((z, z2), 1)
            else:
                z = layer.reverse(z)
        return z

    def log_likelihood(self, x: torch.Tensor, dequantize: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image log-probability (nats) of quantised x, as openai and y0ast estimate it.

        x holds bin corners `k / n_bins - 0.5` (see `quantize_pixels`), n_bins = 2^n_bits.
        Uniform noise u ~ U[0, 1/n_bins) per dimension spreads each bin over its cell, and
        log P(x) >= E_u[log p(x + u)] - D·log(n_bins): the density integrated over a cell
        of volume n_bins^-D. One noise draw gives the usual single-sample estimate;
        `dequantize=False` evaluates at the bin corner instead (deterministic).
        """
        n_bins = 2 ** self.config.n_bits
        if dequantize:
            x = x + torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) / n_bins
        discretisation = self.config.n_dims * math.log(n_bins)
        return self.encode(x).log_density - discretisation

    def bits_per_dim(self, x: torch.Tensor, dequantize: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image negative log-likelihood in bits per sub-pixel: -log2 P(x) / (C·H·W)."""
        nll = -self.log_likelihood(x, dequantize, generator)
        return nll / (math.log(2.0) * self.config.n_dims)


class GlowGenerator(Generator):
    """Glow behind the Generator interface: standard-normal rows in, [-1, 1]-ish images out.

    A row z becomes the top latent `mean + exp(logs) * temperature * z` under the learned top
    prior; split levels are sampled at the same temperature. Images are y0ast's x times 2.
    """

    format = "glow_y0ast"

    def __init__(self, glow: Glow, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.glow = glow
        self.temperature = temperature
        self.latent_shape = glow.config.top_shape
        self.latent_dim = math.prod(self.latent_shape)
        self.resolution = glow.config.resolution

    @property
    def split_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each level's factored-out half, finest level first."""
        c, side = self.glow.config.in_channels, self.resolution
        shapes = []
        for _ in range(self.glow.n_splits):
            c, side = c * 2, side // 2  # squeeze (x4) then keep half
            shapes.append((c, side, side))
        return shapes

    def sample_split_noise(self, n: int, seed: int = 0, start: int = 0) -> list[torch.Tensor]:
        """Standard-normal noise for the split levels of rows `start .. start+n-1`.

        Row i depends on (seed, i) only, from a stream separate from `sample_latents`.
        """
        sizes = [math.prod(s) for s in self.split_shapes]
        rows = np.random.RandomState([seed, 1]).randn(start + n, sum(sizes))[start:].astype(np.float32)
        chunks = np.split(rows, np.cumsum(sizes)[:-1], axis=1)
        return [torch.from_numpy(np.ascontiguousarray(c)).reshape(n, *s)
                for c, s in zip(chunks, self.split_shapes)]

    def forward(self, z: torch.Tensor, temperature: float | None = None,
                split_noise: Sequence[torch.Tensor] | None = None,
                generator: torch.Generator | None = None, **opts: Any) -> torch.Tensor:
        """z [N, latent_dim] (or [N, C, H, W]) standard normal -> images N x C x R x R.

        `split_noise` (standard normal, shaped as `split_shapes`) is scaled by the temperature
        like z; without it the split levels draw from `generator`.
        """
        if opts:
            raise TypeError(f"GlowGenerator.forward got unknown options {sorted(opts)}")
        t = self.temperature if temperature is None else temperature
        mean, logs = self.glow.top_prior(z.shape[0])
        z_top = mean + torch.exp(logs) * t * z.reshape(mean.shape)
        eps = None if split_noise is None else [t * e.to(z_top) for e in split_noise]
        return 2.0 * self.glow.decode(z_top, t, eps, generator)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "temperature": self.temperature, "glow": asdict(self.glow.config)}
