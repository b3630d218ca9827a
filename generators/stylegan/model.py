"""StyleGAN (v1, Karras et al. 2019) generator `G_style` in PyTorch, with the official TF semantics.

Built by `generators.stylegan.tf.load_stylegan_tf` from the official pickles (or from a
config, randomly initialised as the TF code would); sampled by the patchscope commands.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchscope.generators.base import NOISE_MODES, StyleGenerator
from patchscope.generators.stylegan.ops import (ACTIVATION_GAIN, EqualizedConv, EqualizedDense, ProgressiveShape, activation,
                                     blur2d, blur_kernel, instance_norm, pixel_norm, uses_fused_scale)

# Paper sampling defaults (the official `G_style` keyword defaults).
DEFAULT_PSI = 0.7
DEFAULT_TRUNCATION_CUTOFF = 8


@dataclass(frozen=True)
class StyleGANConfig(ProgressiveShape):
    """The `G_style` / `G_mapping` / `G_synthesis` keyword arguments that shape the network."""

    resolution: int = 1024
    latent_dim: int = 512            # latent_size
    w_dim: int = 512                 # dlatent_size
    mapping_layers: int = 8
    mapping_fmaps: int = 512
    mapping_lrmul: float = 0.01
    mapping_nonlinearity: str = "lrelu"
    normalize_latents: bool = True
    num_channels: int = 3
    fmap_base: int = 8192
    fmap_decay: float = 1.0
    fmap_max: int = 512
    nonlinearity: str = "lrelu"
    use_wscale: bool = True
    use_noise: bool = True
    use_pixel_norm: bool = False
    use_instance_norm: bool = True
    const_input_layer: bool = True
    fused_scale: bool | str = "auto"
    blur_filter: tuple[float, ...] | None = (1.0, 2.0, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        # one module per mapping layer: a crafted count would stall building even on the meta device
        if isinstance(self.mapping_layers, bool) or not isinstance(self.mapping_layers, int) \
                or not 1 <= self.mapping_layers <= 64:
            raise ValueError(f"mapping_layers must be an integer from 1 to 64, got {self.mapping_layers!r:.40}")

    @property
    def num_layers(self) -> int:
        """Two style layers per resolution from 4x4 up."""
        return 2 * self.resolution_log2 - 2

    @staticmethod
    def layer_resolution(layer: int) -> int:
        return 2 ** (layer // 2 + 2)


class MappingNetwork(nn.Module):
    """`G_mapping`: optional pixel norm on z, then dense layers with a learning-rate multiplier."""

    def __init__(self, cfg: StyleGANConfig) -> None:
        super().__init__()
        self.normalize_latents = cfg.normalize_latents
        self.act = activation(cfg.mapping_nonlinearity)
        sizes = [cfg.latent_dim] + [cfg.mapping_fmaps] * (cfg.mapping_layers - 1) + [cfg.w_dim]
        self.dense = nn.ModuleList(
            EqualizedDense(sizes[i], sizes[i + 1], ACTIVATION_GAIN, cfg.use_wscale, cfg.mapping_lrmul)
            for i in range(cfg.mapping_layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(z) if self.normalize_latents else z
        for layer in self.dense:
            x = self.act(layer(x))
        return x


class SynthesisLayer(nn.Module):
    """One style layer: optional conv (blurred after upsampling), then the `layer_epilogue`:
    noise times a per-channel weight, bias, activation, normalisation, style modulation."""

    def __init__(self, cfg: StyleGANConfig, layer: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        res = cfg.layer_resolution(layer)
        self.conv: EqualizedConv | None = None
        self.blur = False
        if layer > 0:
            upsample = layer % 2 == 0
            self.conv = EqualizedConv(in_channels, out_channels, 3, ACTIVATION_GAIN, cfg.use_wscale,
                                      resample="up" if upsample else "none",
                                      fused=upsample and uses_fused_scale(cfg.fused_scale, res),
                                      bias=False)
            self.blur = upsample and cfg.blur_filter is not None
        if self.blur:
            self.register_buffer("blur_kernel", blur_kernel(cfg.blur_filter), persistent=False)
        self.use_noise = cfg.use_noise
        if cfg.use_noise:
            self.noise_strength = nn.Parameter(torch.zeros(out_channels))
            self.register_buffer("noise_const", torch.randn(1, 1, res, res))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.act = activation(cfg.nonlinearity)
        self.use_pixel_norm = cfg.use_pixel_norm
        self.use_instance_norm = cfg.use_instance_norm
        self.style = EqualizedDense(cfg.w_dim, 2 * out_channels, gain=1.0, use_wscale=cfg.use_wscale)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        if self.blur:
            x = blur2d(x, self.blur_kernel)
        if self.use_noise and noise_mode != "none":
            if noise_mode == "const":
                noise = self.noise_const
            else:
                noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.view(1, -1, 1, 1)
        x = self.act(x + self.bias.view(1, -1, 1, 1))
        if self.use_pixel_norm:
            x = pixel_norm(x)
        if self.use_instance_norm:
            x = instance_norm(x)
        style = self.style(w).view(-1, 2, x.shape[1], 1, 1)
        return x * (style[:, 0] + 1) + style[:, 1]


class SynthesisNetwork(nn.Module):
    """`G_synthesis` at its full resolution (lod 0): per-layer ws [N, num_layers, w_dim] -> image."""

    def __init__(self, cfg: StyleGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        first = cfg.channels(1)
        if cfg.const_input_layer:
            self.const = nn.Parameter(torch.ones(1, first, 4, 4))
        else:
            # The official code divides the gain by 4 here to match Progressive GAN; the
            # bias of this scope belongs to layer 0's epilogue.
            self.input_dense = EqualizedDense(cfg.w_dim, first * 16, ACTIVATION_GAIN / 4, cfg.use_wscale,
                                              bias=False)
        layers = []
        for layer in range(cfg.num_layers):
            out_channels = cfg.channels(layer // 2 + 1)
            in_channels = cfg.channels(max(layer - 1, 0) // 2 + 1)
            layers.append(SynthesisLayer(cfg, layer, in_channels, out_channels))
        self.layers = nn.ModuleList(layers)
        self.torgb = EqualizedConv(cfg.channels(cfg.resolution_log2 - 1), cfg.num_channels, 1,
                                   gain=1.0, use_wscale=cfg.use_wscale)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        if self.cfg.const_input_layer:
            x = self.const.expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.input_dense(ws[:, 0]).view(ws.shape[0], -1, 4, 4)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i], noise_mode)
        return self.torgb(x)


class StyleGAN(StyleGenerator):
    """StyleGAN v1 `G_style`: mapping, truncation toward `w_avg`, synthesis; D_basic attached.

    As in `G_style`, a `truncation_cutoff` of None means no truncation at all (whatever psi),
    where StyleGAN2 reads None as every layer.
    """

    format = "stylegan_tf"

    def __init__(self, cfg: StyleGANConfig, psi: float = DEFAULT_PSI,
                 truncation_cutoff: int | None = DEFAULT_TRUNCATION_CUTOFF,
                 noise_mode: str = "const") -> None:
        super().__init__(psi=psi, truncation_cutoff=truncation_cutoff, noise_mode=noise_mode)
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.w_dim = cfg.w_dim
        self.num_ws = cfg.num_layers
        self.resolution = cfg.resolution
        self.mapping_network = MappingNetwork(cfg)
        self.synthesis_network = SynthesisNetwork(cfg)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))  # `dlatent_avg`

    def truncate(self, ws: torch.Tensor, w_avg: torch.Tensor, psi: float | None,
                 truncation_cutoff: int | None) -> torch.Tensor:
        # G_style truncates only when it has a cutoff: None turns truncation off (StyleGAN2: all layers)
        cutoff = self.truncation_cutoff if truncation_cutoff is None else truncation_cutoff
        if cutoff is None:
            return ws
        return super().truncate(ws, w_avg, psi, cutoff)

    def mapping(self, z: torch.Tensor, psi: float | None = None,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        w = self.mapping_network(z)
        ws = w[:, None, :].expand(-1, self.num_ws, -1)
        return self.truncate(ws, self.w_avg, psi, truncation_cutoff)

    def synthesis(self, ws: torch.Tensor, noise_mode: str | None = None) -> torch.Tensor:
        noise_mode = self.noise_mode if noise_mode is None else noise_mode
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
        if ws.dim() == 2:
            ws = ws[:, None, :].expand(-1, self.num_ws, -1)
        if ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.num_ws}, {self.w_dim}] or [N, {self.w_dim}], "
                             f"got {list(ws.shape)}")
        return self.synthesis_network(ws, noise_mode)
