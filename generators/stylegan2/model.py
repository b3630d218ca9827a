"""StyleGAN2 generator and discriminator in pure PyTorch, and the rosinality `.pt` loader.

Used by `generators.load_generator` and the attacks; module names equal rosinality's keys, and
`generators.stylegan2.nvlabs` maps NVlabs pickles onto the same modules.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchscope.common.errors import CheckpointError
from patchscope.generators.base import NOISE_MODES, StyleGenerator
from patchscope.generators.io.bounds import MAX_CHANNELS, MAX_RESOLUTION, build_within
from patchscope.generators.io.safe_pickle import load_torch
from patchscope.generators.stylegan2.layers import (
    ConstantInput, ConvLayer, EqualLinear, PixelNorm, ResBlock, StyledConv, ToRGB, minibatch_stddev,
)

MAPPING_LR_MUL = 0.01


@dataclass(frozen=True)
class StyleGAN2Config:
    """Everything that fixes the generator's shapes; `channels[i]` is the width at 4·2^i px."""

    size: int
    style_dim: int
    n_mlp: int
    channels: tuple[int, ...]
    latent_dim: int | None = None  # z width; the same as style_dim in every published model
    lr_mlp: float = MAPPING_LR_MUL
    conv_clamp: float | None = None

    def __post_init__(self) -> None:
        log = math.log2(self.size)
        if self.size < 8 or log != int(log):
            raise ValueError(f"StyleGAN2 size must be a power of two >= 8, not {self.size}")
        if len(self.channels) != int(log) - 1:
            raise ValueError(f"need {int(log) - 1} channel widths for size {self.size}, got {len(self.channels)}")

    @property
    def z_dim(self) -> int:
        return self.style_dim if self.latent_dim is None else self.latent_dim

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    def width(self, res: int) -> int:
        return self.channels[int(math.log2(res)) - 2]


def rosinality_channels(size: int, channel_multiplier: int = 2) -> tuple[int, ...]:
    """rosinality's width table (512 up to 32 px, then halving), from 4 px to `size`."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
             128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
             512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return tuple(table[2 ** i] for i in range(2, int(math.log2(size)) + 1))


def nvlabs_channels(size: int, channel_base: int = 32768, channel_max: int = 512) -> tuple[int, ...]:
    """NVlabs' width rule `min(channel_base // res, channel_max)`, from 4 px to `size`."""
    return tuple(min(channel_base // 2 ** i, channel_max) for i in range(2, int(math.log2(size)) + 1))


class StyleGAN2Generator(StyleGenerator):
    """StyleGAN2 (config F, skip generator): mapping MLP, constant input, modulated convs, skip toRGBs."""

    def __init__(self, config: StyleGAN2Config, psi: float = 1.0, truncation_cutoff: int | None = None,
                 noise_mode: str = "const", format: str = "stylegan2") -> None:
        super().__init__(psi, truncation_cutoff, noise_mode)
        self.config = config
        self.format = format
        self.latent_dim = config.z_dim
        self.w_dim = config.style_dim
        self.resolution = config.size
        self.num_ws = config.log_size * 2 - 2
        self.num_layers = config.log_size * 2 - 3  # styled convs, one noise map each
        dim, clamp, width = config.style_dim, config.conv_clamp, config.width

        mlp = [EqualLinear(config.z_dim if i == 0 else dim, dim, lr_mul=config.lr_mlp, activate=True)
               for i in range(config.n_mlp)]
        self.style = nn.Sequential(PixelNorm(), *mlp)
        self.input = ConstantInput(width(4))
        self.conv1 = StyledConv(width(4), width(4), dim, clamp=clamp)
        self.to_rgb1 = ToRGB(width(4), dim, upsample=False, clamp=clamp)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for log in range(3, config.log_size + 1):
            res = 2 ** log
            self.convs.append(StyledConv(width(res // 2), width(res), dim, upsample=True, clamp=clamp))
            self.convs.append(StyledConv(width(res), width(res), dim, clamp=clamp))
            self.to_rgbs.append(ToRGB(width(res), dim, clamp=clamp))
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, res, res))
        # not persistent: rosinality keeps the average beside the state dict (`latent_avg`)
        self.register_buffer("w_avg", torch.zeros(dim), persistent=False)
        self.w_avg_source = "unset"

    @torch.no_grad()
    def estimate_w_avg(self, n: int = 4096, seed: int = 0) -> torch.Tensor:
        """Mean of the mapping output over `n` latents from a fixed seed (rosinality's `mean_latent`)."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=gen).to(self.w_avg.device)
        return self.style(z).mean(dim=0)

    def mapping(self, z: torch.Tensor, psi: float | None = None,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [N, {self.latent_dim}], got {list(z.shape)}")
        ws = self.style(z).unsqueeze(1).repeat(1, self.num_ws, 1)
        return self.truncate(ws, self.w_avg, psi, truncation_cutoff)

    def broadcast_ws(self, ws: torch.Tensor) -> torch.Tensor:
        """[N, w_dim] -> [N, num_ws, w_dim]; per-layer ws pass through after a shape check."""
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).repeat(1, self.num_ws, 1)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [N, {self.w_dim}] or [N, {self.num_ws}, {self.w_dim}], "
                             f"got {list(ws.shape)}")
        return ws

    def layer_noises(self, batch: int, noise_mode: str,
                     noise: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
        """One noise map (or None) per styled conv; entries of `noise` override the mode."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
        if noise is not None and len(noise) != self.num_layers:
            raise ValueError(f"noise must list {self.num_layers} maps, got {len(noise)}")
        maps: list[torch.Tensor | None] = []
        for i in range(self.num_layers):
            buffer = getattr(self.noises, f"noise_{i}")
            if noise is not None and noise[i] is not None:
                maps.append(noise[i])
            elif noise_mode == "const":
                maps.append(buffer)
            elif noise_mode == "random":
                maps.append(torch.randn(batch, 1, *buffer.shape[2:], device=buffer.device, dtype=buffer.dtype))
            else:
                maps.append(None)
        return maps

    def synthesis(self, ws: torch.Tensor, noise_mode: str | None = None,
                  noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        ws = self.broadcast_ws(ws)
        noises = self.layer_noises(ws.shape[0], self.noise_mode if noise_mode is None else noise_mode, noise)
        x = self.conv1(self.input(ws.shape[0]), ws[:, 0], noises[0])
        img = self.to_rgb1(x, ws[:, 1])
        i = 1  # a toRGB shares its w with the next scale's first conv
        for up, conv, to_rgb, n_up, n_conv in zip(self.convs[::2], self.convs[1::2], self.to_rgbs,
                                                  noises[1::2], noises[2::2]):
            x = up(x, ws[:, i], n_up)
            x = conv(x, ws[:, i + 1], n_conv)
            img = to_rgb(x, ws[:, i + 2], img)
            i += 2
        return img

    def forward(self, z: torch.Tensor, psi: float | None = None, truncation_cutoff: int | None = None,
                noise_mode: str | None = None, input_is_w: bool = False, mix_z: torch.Tensor | None = None,
                inject_index: int | None = None, noise: Sequence[torch.Tensor | None] | None = None,
                **opts: Any) -> torch.Tensor:
        """Images from z (or from w with `input_is_w`); with `mix_z`, layers from `inject_index` on use it.

        `inject_index` defaults to a random layer in [1, num_ws), drawn from torch's RNG as
        rosinality does.
        """
        if opts:
            raise TypeError(f"unknown options for StyleGAN2: {sorted(opts)}")
        ws = self.broadcast_ws(z) if input_is_w else self.mapping(z, psi=1)
        if mix_z is not None:
            ws2 = self.broadcast_ws(mix_z) if input_is_w else self.mapping(mix_z, psi=1)
            if inject_index is None:
                inject_index = int(torch.randint(1, self.num_ws, ()))
            ws = torch.cat([ws[:, :inject_index], ws2[:, inject_index:]], dim=1)
        ws = self.truncate(ws, self.w_avg, psi, truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, noise=noise)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_mlp": self.config.n_mlp, "channels": list(self.config.channels),
                "conv_clamp": self.config.conv_clamp, "w_avg_source": self.w_avg_source}


class StyleGAN2Discriminator(nn.Module):
    """Residual discriminator: fromRGB, one ResBlock per scale, minibatch stddev, conv, two linears."""

    def __init__(self, size: int, channels: Sequence[int], stddev_group: int | None = 4, stddev_feat: int = 1,
                 conv_clamp: float | None = None, img_channels: int = 3) -> None:
        super().__init__()
        log_size = int(math.log2(size))
        width = {2 ** (i + 2): c for i, c in enumerate(channels)}
        layers: list[nn.Module] = [ConvLayer(img_channels, width[size], 1, clamp=conv_clamp)]
        for log in range(log_size, 2, -1):
            layers.append(ResBlock(width[2 ** log], width[2 ** (log - 1)], clamp=conv_clamp))
        self.convs = nn.Sequential(*layers)
        self.stddev_group, self.stddev_feat = stddev_group, stddev_feat
        self.final_conv = ConvLayer(width[4] + stddev_feat, width[4], 3, clamp=conv_clamp)
        self.final_linear = nn.Sequential(EqualLinear(width[4] * 16, width[4], activate=True),
                                          EqualLinear(width[4], 1))
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, size, size] in [-1, 1] -> realness logits [N, 1]; N a multiple of the group."""
        x = self.convs(img)
        x = minibatch_stddev(x, self.stddev_group, self.stddev_feat)
        x = self.final_conv(x)
        return self.final_linear(x.flatten(1))


def count_indexed_keys(state: Mapping[str, Any], pattern: str, start: int = 0) -> int:
    """How many of pattern.format(start), pattern.format(start + 1), ... are keys, in a row."""
    i = start
    while pattern.format(i) in state:
        i += 1
    return i - start


def infer_generator_config(state: Mapping[str, torch.Tensor], conv_clamp: float | None = None,
                           lr_mlp: float = MAPPING_LR_MUL) -> StyleGAN2Config:
    """Size, style width, mapping depth and per-scale widths read off a rosinality `g` state dict."""
    n_mlp = count_indexed_keys(state, "style.{}.weight", start=1)  # style.0 is the pixel norm
    n_convs = count_indexed_keys(state, "convs.{}.conv.weight")
    if n_mlp == 0 or n_convs < 2 or n_convs % 2 or "input.input" not in state:
        raise KeyError("it needs style.1.weight, input.input and pairs of convs.{i}.conv.weight")
    channels = [state["input.input"].shape[1]]
    channels += [state[f"convs.{j}.conv.weight"].shape[1] for j in range(0, n_convs, 2)]
    _check_widths(2 ** (n_convs // 2 + 2), [*channels, *state["style.1.weight"].shape[:2]])
    return StyleGAN2Config(size=2 ** (n_convs // 2 + 2), style_dim=state["style.1.weight"].shape[0],
                           n_mlp=n_mlp, channels=tuple(int(c) for c in channels),
                           latent_dim=state["style.1.weight"].shape[1], lr_mlp=lr_mlp, conv_clamp=conv_clamp)


def _check_widths(size: int, widths: Sequence[int]) -> None:
    """Sizes read off tensor shapes, within what any StyleGAN2 uses (else ValueError)."""
    if size > MAX_RESOLUTION:
        raise ValueError(f"{size} px is above the {MAX_RESOLUTION} px supported")
    if not all(1 <= int(w) <= MAX_CHANNELS for w in widths):
        raise ValueError(f"widths {[int(w) for w in widths][:8]} outside 1..{MAX_CHANNELS}")


def infer_discriminator(state: Mapping[str, torch.Tensor], conv_clamp: float | None = None,
                        stddev_group: int | None = 4) -> StyleGAN2Discriminator:
    """A discriminator shaped like a rosinality `d` state dict (widths read from its keys)."""
    n_blocks = count_indexed_keys(state, "convs.{}.conv1.0.weight", start=1)
    if "convs.0.0.weight" not in state or "final_conv.0.weight" not in state or n_blocks == 0:
        raise KeyError("it needs convs.0.0.weight, convs.{i}.conv1.0.weight and final_conv.0.weight")
    size = 2 ** (n_blocks + 2)
    widths = [int(state[f"convs.{i}.conv2.1.weight"].shape[0]) for i in range(n_blocks, 0, -1)]
    widths.append(int(state["convs.0.0.weight"].shape[0]))
    feat = int(state["final_conv.0.weight"].shape[1] - state["final_conv.0.weight"].shape[0])
    _check_widths(size, [*widths, int(state["convs.0.0.weight"].shape[1])])
    return StyleGAN2Discriminator(size, widths, stddev_group=stddev_group, stddev_feat=feat,
                                  conv_clamp=conv_clamp, img_channels=int(state["convs.0.0.weight"].shape[1]))


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, part: str) -> None:
    """`load_state_dict(strict=True)`, with a mismatch reported as one CheckpointError line."""
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{source}: '{part}' does not fit a StyleGAN2 of the inferred shape ({detail})") from None


def build_generator(g_state: Mapping[str, torch.Tensor], source: str, part: str, *,
                    w_avg: torch.Tensor | None, w_avg_source: str, conv_clamp: float | None = None,
                    lr_mlp: float = MAPPING_LR_MUL, psi: float = 1.0, truncation_cutoff: int | None = None,
                    noise_mode: str = "const", format: str = "stylegan2") -> StyleGAN2Generator:
    """A generator with `g_state` (rosinality keys) loaded and its truncation average set."""
    try:
        if not isinstance(g_state, Mapping):
            raise ValueError(f"it is a {type(g_state).__name__}")
        config = infer_generator_config(g_state, conv_clamp=conv_clamp, lr_mlp=lr_mlp)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{source}: '{part}' is not a StyleGAN2 generator state dict "
                              f"({err.args[0] if err.args else type(err).__name__})") from None
    gen = build_within(lambda: StyleGAN2Generator(config, psi=psi, truncation_cutoff=truncation_cutoff,
                                                  noise_mode=noise_mode, format=format),
                       g_state.values(), f"{source}: '{part}'")
    load_weights(gen, g_state, source, part)
    gen.eval()
    if w_avg is None:
        gen.w_avg.copy_(gen.estimate_w_avg())
        gen.w_avg_source = "estimated from 4096 latents, seed 0"
    else:
        gen.w_avg.copy_(torch.as_tensor(w_avg, dtype=torch.float32).reshape(-1))
        gen.w_avg_source = w_avg_source
    return gen


def load_rosinality(ckpt: Mapping[str, Any], use_ema: bool = True, psi: float = 1.0,
                    truncation_cutoff: int | None = None, noise_mode: str = "const",
                    w_avg: torch.Tensor | None = None, with_discriminator: bool = True,
                    source: str = "checkpoint") -> StyleGAN2Generator:
    """A generator from a rosinality dict: train layout (`g`, `d`, `g_ema`, `args`) or converter layout.

    `use_ema=False` picks `g`. The truncation average is `w_avg` if given, else the file's
    `latent_avg`, else estimated from 4096 fixed-seed latents. `d` becomes `.discriminator`.
    """
    part = "g_ema" if use_ema else "g"
    if not isinstance(ckpt, Mapping) or part not in ckpt:
        found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{source}: expected a rosinality StyleGAN2 checkpoint with '{part}', found {found}")
    args = ckpt.get("args")
    if getattr(args, "arch", "stylegan2") != "stylegan2":
        raise CheckpointError(f"{source}: architecture {args.arch!r} is not supported, only 'stylegan2'")
    stored = ckpt.get("latent_avg")
    gen = build_generator(ckpt[part], source, part,
                          w_avg=w_avg if w_avg is not None else stored,
                          w_avg_source="given" if w_avg is not None else "checkpoint latent_avg",
                          psi=psi, truncation_cutoff=truncation_cutoff, noise_mode=noise_mode,
                          format="rosinality")
    if with_discriminator and "d" in ckpt:
        gen.discriminator = build_discriminator(ckpt["d"], source, "d")
    return gen


def build_discriminator(d_state: Mapping[str, torch.Tensor], source: str, part: str,
                        conv_clamp: float | None = None, stddev_group: int | None = 4) -> StyleGAN2Discriminator:
    """A discriminator with `d_state` (rosinality keys) loaded, in eval mode."""
    try:
        if not isinstance(d_state, Mapping):
            raise ValueError(f"it is a {type(d_state).__name__}")
        with torch.device("meta"):  # shapes checked first, without memory
            infer_discriminator(d_state, conv_clamp=conv_clamp, stddev_group=stddev_group)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{source}: '{part}' is not a StyleGAN2 discriminator state dict "
                              f"({err.args[0] if err.args else type(err).__name__})") from None
    disc = build_within(lambda: infer_discriminator(d_state, conv_clamp=conv_clamp, stddev_group=stddev_group),
                        d_state.values(), f"{source}: '{part}'")
    load_weights(disc, d_state, source, part)
    return disc.eval()


def export_rosinality(gen: StyleGAN2Generator) -> dict[str, Any]:
    """The converter layout (`g_ema`, `latent_avg`, and `d` when attached), loadable by `load_rosinality`."""
    state = {k: v.detach().clone() for k, v in gen.state_dict().items() if not k.startswith("discriminator.")}
    out: dict[str, Any] = {"g_ema": state, "latent_avg": gen.w_avg.detach().clone()}
    if gen.discriminator is not None:
        out["d"] = {k: v.detach().clone() for k, v in gen.discriminator.state_dict().items()}
    return out


def load_rosinality_file(path: str | os.PathLike, **opts: Any) -> StyleGAN2Generator:
    """`load_rosinality` on a `.pt` read with `torch.load(weights_only=True)`; errors name the file."""
    return load_rosinality(load_torch(path), source=str(path), **opts)
