"""Progressive GAN as pytorch_GAN_zoo builds it (the torch.hub `PGAN` celebAHQ checkpoints):
generator, discriminator, loading and saving `{'config','netG','netD','avgG'}` files.

Used by `generators.io.formats` (format `pgan_zoo`), the small trainable PGAN, and sampling.
Parameter names equal the zoo's, so `state_dict()` of either network is a zoo state dict.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchscope.common.atomic import replace_atomically
from patchscope.common.errors import CheckpointError
from patchscope.generators.base import Generator
from patchscope.generators.io.bounds import MAX_CHANNELS, MAX_RESOLUTION, build_within, check_dimension
from patchscope.generators.io.safe_pickle import BaseConfig

# pytorch_GAN_zoo's default celebAHQ depths: scale 0 then one entry per doubling (8 px ... 1024 px).
ZOO_DEPTH_SCALE0 = 512
ZOO_DEFAULT_OTHER_DEPTHS = (512, 512, 512, 256, 128, 64, 32, 16)
ZOO_FLAGS = {"leakyReluLeak": 0.2, "perChannelNormalization": True, "miniBatchStdDev": True,
             "equalizedlR": True, "alpha": 0.0}


def pixel_norm(x: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Normalise every pixel's feature vector to unit mean square (PGAN's PN)."""
    return x * (x.square().mean(dim=1, keepdim=True) + epsilon).rsqrt()


def upscale_nearest(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def zoo_minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """The zoo's minibatch-stddev channel: unbiased variance over groups of min(4, N).

    As pytorch_GAN_zoo's `miniBatchStdDev` (models/networks/mini_batch_stddev_module.py since its
    2019 bugfix f5c8125): the groups are contiguous blocks (samples 0..s-1, s..2s-1, ...), each
    block's mean standard deviation goes to its own samples. A batch not divisible by the group
    size is one group; a group of one gives zeros. (TF's layer groups strided samples instead.)
    """
    n, c, h, w = x.shape
    size = min(n, group_size)
    if n % size:
        size = n
    groups = n // size
    if size == 1:
        return torch.cat([x, x.new_zeros(n, 1, h, w)], dim=1)
    y = x.reshape(groups, size, c, h, w).var(dim=1, unbiased=True)
    y = (y + 1e-8).sqrt().reshape(groups, -1).mean(dim=1)
    y = y.reshape(groups, 1, 1, 1, 1).expand(groups, size, 1, h, w).reshape(n, 1, h, w)
    return torch.cat([x, y], dim=1)


class EqualizedLayer(nn.Module):
    """A conv or linear layer whose whole output, bias included, is scaled by sqrt(2 / fan_in).

    The zoo applies He's constant after the bias (unlike the TF original); the wrapped
    layer sits under `.module` so the parameter names match the zoo's.
    """

    def __init__(self, module: nn.Conv2d | nn.Linear, equalized: bool = True) -> None:
        super().__init__()
        self.module = module
        self.equalized = equalized
        fan_in = math.prod(module.weight.shape[1:])
        self.scale = math.sqrt(2.0 / fan_in) if equalized else 1.0
        if equalized and module.weight.device.type != "meta":
            nn.init.normal_(module.weight)  # equalized learning rate: N(0, 1) weights, zero bias
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out * self.scale if self.equalized else out


def _conv(c_in: int, c_out: int, kernel: int, equalized: bool) -> EqualizedLayer:
    return EqualizedLayer(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), equalized)


class PGANZooGenerator(Generator):
    """pytorch_GAN_zoo `GNet`: latent -> 4x4 -> (nearest 2x, conv, conv) per scale -> toRGB.

    `alpha` blends the last scale with the upsampled output of the previous one, as
    during progressive growing; 0 gives the full-resolution output.
    """

    format = "pgan_zoo"

    def __init__(self, latent_dim: int = 512, depth_scale0: int = ZOO_DEPTH_SCALE0,
                 depth_other_scales: Sequence[int] = ZOO_DEFAULT_OTHER_DEPTHS[:6], dim_output: int = 3,
                 leaky_relu_leak: float = 0.2, normalization: bool = True, equalized: bool = True,
                 alpha: float = 0.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.depths = [depth_scale0, *depth_other_scales]
        self.resolution = 4 * 2 ** len(depth_other_scales)
        self.dim_output = dim_output
        self.leaky_relu_leak = leaky_relu_leak
        self.normalization = normalization
        self.equalized = equalized
        self.alpha = alpha
        # Created in the zoo's order, so state dicts list their keys exactly as the zoo's do.
        self.scaleLayers = nn.ModuleList()
        self.toRGBLayers = nn.ModuleList()
        self.formatLayer = EqualizedLayer(nn.Linear(latent_dim, 16 * depth_scale0), equalized)
        self.groupScale0 = nn.ModuleList([_conv(depth_scale0, depth_scale0, 3, equalized)])
        self.toRGBLayers.append(_conv(depth_scale0, dim_output, 1, equalized))
        for previous, depth in zip(self.depths, self.depths[1:]):
            self.scaleLayers.append(nn.ModuleList([_conv(previous, depth, 3, equalized),
                                                   _conv(depth, depth, 3, equalized)]))
            self.toRGBLayers.append(_conv(depth, dim_output, 1, equalized))

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leaky_relu_leak)
        return pixel_norm(x) if self.normalization else x

    def forward(self, z: torch.Tensor, alpha: float | None = None, **opts: Any) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        x = pixel_norm(z) if self.normalization else z
        x = F.leaky_relu(self.formatLayer(x.flatten(1)), self.leaky_relu_leak)
        x = x.reshape(x.shape[0], -1, 4, 4)
        x = pixel_norm(x) if self.normalization else x
        for conv in self.groupScale0:
            x = self._activate(conv(x))
        previous_rgb = None
        if alpha > 0 and len(self.scaleLayers) == 1:
            previous_rgb = upscale_nearest(self.toRGBLayers[-2](x))
        for scale, group in enumerate(self.scaleLayers):
            x = upscale_nearest(x)
            for conv in group:
                x = self._activate(conv(x))
            if alpha > 0 and scale == len(self.scaleLayers) - 2:
                previous_rgb = upscale_nearest(self.toRGBLayers[-2](x))
        x = self.toRGBLayers[-1](x)
        if previous_rgb is not None:
            x = alpha * previous_rgb + (1.0 - alpha) * x
        return x

    def add_scale(self, depth: int) -> None:
        """Double the output resolution (the zoo's `addScale`): a new conv pair of `depth`
        channels and its toRGB, initialised from the global RNG, on the network's device."""
        device = self.formatLayer.module.weight.device
        self.scaleLayers.append(nn.ModuleList([_conv(self.depths[-1], depth, 3, self.equalized),
                                               _conv(depth, depth, 3, self.equalized)]).to(device))
        self.toRGBLayers.append(_conv(depth, self.dim_output, 1, self.equalized).to(device))
        self.depths.append(depth)
        self.resolution *= 2

    def zoo_config(self) -> dict[str, Any]:
        """The zoo `config` entries that rebuild this network."""
        return {"depthScale0": self.depths[0], "depthOtherScales": list(self.depths[1:]),
                "latentVectorDim": self.latent_dim, "noiseVectorDim": self.latent_dim,
                "categoryVectorDim": 0, "dimOutput": self.dim_output,
                "leakyReluLeak": self.leaky_relu_leak, "perChannelNormalization": self.normalization,
                "equalizedlR": self.equalized, "alpha": self.alpha, "initBiasToZero": True}


class PGANZooDiscriminator(nn.Module):
    """pytorch_GAN_zoo `DNet`: fromRGB -> (conv, conv, 2x avg-pool) per scale -> minibatch stddev
    -> 3x3 conv -> linear -> decision. `return_features` also gives the activations before
    the decision layer."""

    def __init__(self, depth_scale0: int = ZOO_DEPTH_SCALE0,
                 depth_other_scales: Sequence[int] = ZOO_DEFAULT_OTHER_DEPTHS[:6], dim_input: int = 3,
                 size_decision_layer: int = 1, leaky_relu_leak: float = 0.2,
                 minibatch_stddev: bool = True, equalized: bool = True, alpha: float = 0.0) -> None:
        super().__init__()
        self.depths = [depth_scale0, *depth_other_scales]
        self.resolution = 4 * 2 ** len(depth_other_scales)
        self.leaky_relu_leak = leaky_relu_leak
        self.minibatch_stddev = minibatch_stddev
        self.equalized = equalized
        self.alpha = alpha
        self.scaleLayers = nn.ModuleList()  # the zoo's creation order, as in the generator
        self.fromRGBLayers = nn.ModuleList()
        self.decisionLayer = EqualizedLayer(nn.Linear(depth_scale0, size_decision_layer), equalized)
        self.fromRGBLayers.append(_conv(dim_input, depth_scale0, 1, equalized))
        entry = depth_scale0 + (1 if minibatch_stddev else 0)
        self.groupScaleZero = nn.ModuleList([
            _conv(entry, depth_scale0, 3, equalized),
            EqualizedLayer(nn.Linear(16 * depth_scale0, depth_scale0), equalized)])
        for previous, depth in zip(self.depths, self.depths[1:]):
            self.scaleLayers.append(nn.ModuleList([_conv(depth, depth, 3, equalized),
                                                   _conv(depth, previous, 3, equalized)]))
            self.fromRGBLayers.append(_conv(dim_input, depth, 1, equalized))

    def add_scale(self, depth: int) -> None:
        """Double the input resolution (the zoo's `addScale`): a new fromRGB and conv pair
        of `depth` channels in front, initialised from the global RNG, on the network's device."""
        device = self.decisionLayer.module.weight.device
        dim_input = self.fromRGBLayers[0].module.weight.shape[1]
        self.scaleLayers.append(nn.ModuleList([_conv(depth, depth, 3, self.equalized),
                                               _conv(depth, self.depths[-1], 3, self.equalized)]).to(device))
        self.fromRGBLayers.append(_conv(dim_input, depth, 1, self.equalized).to(device))
        self.depths.append(depth)
        self.resolution *= 2

    def forward(self, x: torch.Tensor, alpha: float | None = None,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        alpha = self.alpha if alpha is None else alpha
        act = functools.partial(F.leaky_relu, negative_slope=self.leaky_relu_leak)
        lower = None
        if alpha > 0 and len(self.fromRGBLayers) > 1:
            lower = act(self.fromRGBLayers[-2](F.avg_pool2d(x, 2)))
        x = act(self.fromRGBLayers[-1](x))
        # The zoo blends only when at least two scales were added (its own quirk, kept).
        merge = alpha > 0 and len(self.scaleLayers) > 1
        for group in reversed(self.scaleLayers):
            for conv in group:
                x = act(conv(x))
            x = F.avg_pool2d(x, 2)
            if merge:
                merge = False
                x = alpha * lower + (1 - alpha) * x
        if self.minibatch_stddev:
            x = zoo_minibatch_stddev(x)
        x = act(self.groupScaleZero[0](x))
        features = act(self.groupScaleZero[1](x.flatten(1)))
        out = self.decisionLayer(features)
        return (out, features) if return_features else out


def build_pgan_zoo(resolution: int = 256, latent_dim: int = 512, depth_scale0: int = ZOO_DEPTH_SCALE0,
                   depth_other_scales: Sequence[int] | None = None, *, leaky_relu_leak: float = 0.2,
                   normalization: bool = True, minibatch_stddev: bool = True,
                   equalized: bool = True) -> tuple[PGANZooGenerator, PGANZooDiscriminator]:
    """A fresh zoo generator and discriminator for `resolution` (default depths: the zoo's celebAHQ)."""
    scales = int(math.log2(resolution)) - 2
    if resolution != 4 * 2 ** scales:
        raise ValueError(f"resolution must be a power of two >= 4, not {resolution}")
    if depth_other_scales is None:
        depth_other_scales = ZOO_DEFAULT_OTHER_DEPTHS[:scales]
    if len(depth_other_scales) != scales:
        raise ValueError(f"{resolution} px needs {scales} depths after scale 0, got {len(depth_other_scales)}")
    generator = PGANZooGenerator(latent_dim, depth_scale0, depth_other_scales, leaky_relu_leak=leaky_relu_leak,
                                 normalization=normalization, equalized=equalized)
    discriminator = PGANZooDiscriminator(depth_scale0, depth_other_scales, leaky_relu_leak=leaky_relu_leak,
                                         minibatch_stddev=minibatch_stddev, equalized=equalized)
    return generator, discriminator


def _config_dict(config: Any) -> dict[str, Any]:
    """The zoo config as a dict, whether saved as a dict or as a `BaseConfig` object."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, BaseConfig):
        try:
            return BaseConfig.to_dict(config)
        except ValueError as error:  # a config that contains itself: a crafted file, not the zoo's
            raise CheckpointError(f"config: {error}") from None
    return {}


MAX_ZOO_SCALES = int(math.log2(MAX_RESOLUTION)) - 2  # scales after 4x4


def _check_sizes(name: str, depths: Sequence[int], **widths: int) -> None:
    """The widths and scales read off the tensor shapes, within what any PGAN uses."""
    for label, value in widths.items():
        check_dimension(value, label.replace("_", " "), MAX_CHANNELS, name)
    if len(depths) > MAX_ZOO_SCALES + 1:
        raise CheckpointError(f"{name}: {len(depths) - 1} scales after 4x4 px; at most {MAX_ZOO_SCALES} "
                              f"({MAX_RESOLUTION} px) are supported")
    for depth in depths:
        check_dimension(depth, "a scale's depth", MAX_CHANNELS, name)


def _depths_from(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Depth of each added scale: the output channels of its first conv (in G and in D)."""
    depths = []
    while f"scaleLayers.{len(depths)}.0.module.weight" in state:
        depths.append(int(state[f"scaleLayers.{len(depths)}.0.module.weight"].shape[0]))
    return depths


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{what} does not match the pytorch_GAN_zoo PGAN layout ({detail})") from error


def _missing_layers(name: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"{name} lacks the pytorch_GAN_zoo PGAN layers ({type(error).__name__}: {error})")


def _build_generator(state: Mapping[str, Any], config: Mapping[str, Any], alpha: float,
                     name: str) -> PGANZooGenerator:
    try:
        args = (int(state["formatLayer.module.weight"].shape[1]), int(state["groupScale0.0.module.weight"].shape[0]),
                _depths_from(state), int(state["toRGBLayers.0.module.weight"].shape[0]),
                float(config["leakyReluLeak"]), bool(config["perChannelNormalization"]),
                bool(config["equalizedlR"]), alpha)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
        raise _missing_layers(name, error) from error
    _check_sizes(name, [args[1], *args[2]], latent_width=args[0], image_channels=args[3])
    # depths come from shapes that may belong to empty or expanded tensors: the network must fit the weights
    generator = build_within(lambda: PGANZooGenerator(*args), state.values(), name)
    _load_strict(generator, state, name)
    return generator


def _build_discriminator(state: Mapping[str, Any], config: Mapping[str, Any],
                         alpha: float) -> PGANZooDiscriminator:
    try:
        from_rgb = state["fromRGBLayers.0.module.weight"]
        decision = state.get("decisionLayer.module.weight")
        args = (int(from_rgb.shape[0]), _depths_from(state), int(from_rgb.shape[1]),
                int(decision.shape[0]) if decision is not None else 1, float(config["leakyReluLeak"]),
                bool(config["miniBatchStdDev"]), bool(config["equalizedlR"]), alpha)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
        raise _missing_layers("netD", error) from error
    _check_sizes("netD", [args[0], *args[1]], image_channels=args[2], decision_width=args[3])
    discriminator = build_within(lambda: PGANZooDiscriminator(*args), state.values(), "netD")
    _load_strict(discriminator, state, "netD")
    return discriminator


def load_pgan_zoo(ckpt: Mapping[str, Any], use_avg: bool = True, alpha: float | None = None,
                  **opts: Any) -> PGANZooGenerator:
    """Build a generator (avgG when `use_avg` and present, else netG) with netD attached as
    `.discriminator`.

    Depths and sizes come from the tensor shapes; flags (pixel norm, minibatch stddev,
    equalized lr, leak, alpha) from `config`, with the zoo defaults when absent.
    """
    if opts:
        raise ValueError(f"option(s) {sorted(opts)} do not apply to pytorch_GAN_zoo PGAN checkpoints")
    config = {**ZOO_FLAGS, **_config_dict(ckpt.get("config"))}
    try:
        alpha = float(config["alpha"] if alpha is None else alpha)
    except (TypeError, ValueError):
        raise CheckpointError(f"config: alpha is {config['alpha']!r:.40}; expected a number") from None
    name = "avgG" if use_avg and ckpt.get("avgG") is not None else "netG"
    generator = _build_generator(ckpt[name], config, alpha, name)
    if ckpt.get("netD") is not None:
        generator.discriminator = _build_discriminator(ckpt["netD"], config, alpha)
    generator.eval()
    return generator


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
            if not k.startswith("discriminator.")}


def save_pgan_zoo(generator: PGANZooGenerator, path: str | os.PathLike, *,
                  net_generator: PGANZooGenerator | None = None,
                  discriminator: PGANZooDiscriminator | None = None,
                  extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write a zoo checkpoint: `generator` as avgG (and as netG unless `net_generator` is given),
    the discriminator (default: `generator.discriminator`) as netD, and a plain-dict config.

    Written to a temporary name and renamed, so a crash never leaves half a file.
    """
    discriminator = discriminator if discriminator is not None else generator.discriminator
    if discriminator is None:
        raise ValueError("a pytorch_GAN_zoo checkpoint needs a discriminator (netD)")
    config = {**generator.zoo_config(), "miniBatchStdDev": discriminator.minibatch_stddev,
              **dict(extra_config or {})}
    state = {"config": config, "netG": _plain_state(net_generator or generator),
             "netD": _plain_state(discriminator), "avgG": _plain_state(generator)}
    path = Path(path)
    replace_atomically(path, lambda file: torch.save(state, file))
    return path
