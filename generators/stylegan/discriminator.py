"""StyleGAN (v1) discriminator `D_basic` in PyTorch, with the official TF semantics.

Built by `generators.stylegan.tf` and attached to the StyleGAN generator as `.discriminator`;
used by generator finetuning (eq. 4) and by anyone scoring images with the GAN's own critic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchscope.generators.stylegan.ops import (EqualizedConv, EqualizedDense, ProgressiveShape, activation, blur2d, blur_kernel,
                                     minibatch_stddev, uses_fused_scale)


@dataclass(frozen=True)
class DiscriminatorConfig(ProgressiveShape):
    """The `D_basic` keyword arguments that shape the network."""

    resolution: int = 1024
    num_channels: int = 3
    fmap_base: int = 8192
    fmap_decay: float = 1.0
    fmap_max: int = 512
    nonlinearity: str = "lrelu"
    use_wscale: bool = True
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1
    fused_scale: bool | str = "auto"
    blur_filter: tuple[float, ...] | None = (1.0, 2.0, 1.0)


class DownBlock(nn.Module):
    """Block `{r}x{r}` for r >= 8: 3x3 conv, then blur and a conv that halves the size."""

    def __init__(self, cfg: DiscriminatorConfig, res_log2: int) -> None:
        super().__init__()
        res = 2 ** res_log2
        self.act = activation(cfg.nonlinearity)
        self.conv0 = EqualizedConv(cfg.channels(res_log2 - 1), cfg.channels(res_log2 - 1), 3,
                                   use_wscale=cfg.use_wscale)
        self.conv1_down = EqualizedConv(cfg.channels(res_log2 - 1), cfg.channels(res_log2 - 2), 3,
                                        use_wscale=cfg.use_wscale, resample="down",
                                        fused=uses_fused_scale(cfg.fused_scale, res))
        self.blur = cfg.blur_filter is not None
        if self.blur:
            self.register_buffer("blur_kernel", blur_kernel(cfg.blur_filter), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv0(x))
        if self.blur:
            x = blur2d(x, self.blur_kernel)
        return self.act(self.conv1_down(x))


class StyleGANDiscriminator(nn.Module):
    """`D_basic` at its full resolution (lod 0): images [N, C, R, R] -> scores [N, 1].

    The minibatch-stddev layer mixes samples in groups of `min(4, N)`, so a score depends
    on the other images of its group; N must be divisible by the group size.
    """

    def __init__(self, cfg: DiscriminatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolution = cfg.resolution
        self.act = activation(cfg.nonlinearity)
        top = cfg.resolution_log2
        self.fromrgb = EqualizedConv(cfg.num_channels, cfg.channels(top - 1), 1, use_wscale=cfg.use_wscale)
        self.blocks = nn.ModuleList(DownBlock(cfg, r) for r in range(top, 2, -1))
        extra = cfg.mbstd_num_features if cfg.mbstd_group_size > 1 else 0
        self.conv = EqualizedConv(cfg.channels(1) + extra, cfg.channels(1), 3, use_wscale=cfg.use_wscale)
        self.dense0 = EqualizedDense(cfg.channels(1) * 16, cfg.channels(0), use_wscale=cfg.use_wscale)
        self.dense1 = EqualizedDense(cfg.channels(0), 1, gain=1.0, use_wscale=cfg.use_wscale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fromrgb(images))
        for block in self.blocks:
            x = block(x)
        if self.cfg.mbstd_group_size > 1:
            x = minibatch_stddev(x, self.cfg.mbstd_group_size, self.cfg.mbstd_num_features)
        x = self.act(self.conv(x))
        x = self.act(self.dense0(x))
        return self.dense1(x)
