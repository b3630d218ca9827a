"""Layers of the official StyleGAN (v1) TensorFlow code, rewritten in PyTorch op for op.

Used by `generators.stylegan.model` and `generators.stylegan.discriminator`; each keeps the TF
semantics (padding, equalized learning rate, filter order) so TF weights give TF outputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchscope.generators.io.bounds import MAX_RESOLUTION

LRELU_SLOPE = 0.2
NORM_EPSILON = 1e-8  # added inside the rsqrt of pixel and instance norm, as TF does
ACTIVATION_GAIN = math.sqrt(2)  # He gain of both `relu` and `lrelu` in the official code
RESAMPLE_MODES = ("none", "up", "down")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The official `nonlinearity` option: 'lrelu' (slope 0.2) or 'relu'."""
    if name == "lrelu":
        return lambda x: F.leaky_relu(x, LRELU_SLOPE)
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown nonlinearity {name!r}; expected 'lrelu' or 'relu'")


def runtime_coef(fan_in: int, gain: float, use_wscale: bool, lrmul: float) -> float:
    """What the stored weight is multiplied by at every call (`get_weight` in the TF code).

    With equalized learning rate the variable holds N(0, 1/lrmul) and the He constant is
    applied at run time; without it only the learning-rate multiplier is.
    """
    he_std = gain / math.sqrt(fan_in)
    return he_std * lrmul if use_wscale else lrmul


def initial_std(fan_in: int, gain: float, use_wscale: bool, lrmul: float) -> float:
    """Standard deviation the TF code initialises the stored weight with."""
    he_std = gain / math.sqrt(fan_in)
    return 1.0 / lrmul if use_wscale else he_std / lrmul


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + NORM_EPSILON)


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x * torch.rsqrt(x.square().mean(dim=(2, 3), keepdim=True) + NORM_EPSILON)


def upscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling (TF tiles every pixel into a factor x factor block)."""
    if factor == 1:
        return x
    n, c, h, w = x.shape
    x = x[:, :, :, None, :, None].expand(n, c, h, factor, w, factor)
    return x.reshape(n, c, h * factor, w * factor)


def downscale2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Box-filter downsampling; TF's 2x case is a stride-2 [0.5, 0.5]^2 filter, i.e. an average."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def blur_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The normalised separable filter `outer(taps, taps) / sum` of `_blur2d`."""
    f = torch.tensor(list(taps), dtype=torch.float32)
    f = f[:, None] * f[None, :]
    return f / f.sum()


def blur2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise filtering with TF 'SAME' padding (the extra pixel of an even filter goes last)."""
    k = kernel.shape[-1]
    before = (k - 1) // 2
    x = F.pad(x, (before, k - 1 - before, before, k - 1 - before))
    channels = x.shape[1]
    weight = kernel.to(x)[None, None].expand(channels, 1, k, k)
    return F.conv2d(x, weight, groups=channels)


def fused_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Sum of the four one-pixel shifts of a [out, in, k, k] kernel: a (k+1) x (k+1) kernel.

    A stride-2 transposed conv with it equals nearest 2x upsampling followed by the k x k
    conv; a stride-2 conv with a quarter of it equals the conv followed by 2x averaging.
    """
    w = F.pad(weight, (1, 1, 1, 1))
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


def minibatch_stddev(x: torch.Tensor, group_size: int, num_features: int = 1) -> torch.Tensor:
    """Append the group standard deviation as extra feature maps (biased variance, as TF).

    Sample i is in group i mod (N / G), since TF splits the batch as [G, N/G, ...].
    """
    n, c, h, w = x.shape
    group = min(group_size, n)
    if n % group:
        raise ValueError(f"minibatch stddev needs a batch divisible by {group}, got {n}")
    y = x.reshape(group, -1, num_features, c // num_features, h, w).float()
    y = y - y.mean(dim=0, keepdim=True)
    y = torch.sqrt(y.square().mean(dim=0) + NORM_EPSILON)
    y = y.mean(dim=(2, 3, 4)).to(x.dtype)  # [N/G, num_features]
    y = y[:, :, None, None].repeat(group, 1, h, w)
    return torch.cat([x, y], dim=1)


class ProgressiveShape:
    """Shape rules the StyleGAN (v1) generator and discriminator configs share: a power-of-two
    `resolution` and the official feature-map count `nf(stage)` from `fmap_base/decay/max`."""

    resolution: int
    fmap_base: int
    fmap_decay: float
    fmap_max: int

    def __post_init__(self) -> None:
        resolution = self.resolution
        if (isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral)
                or not 4 <= resolution <= MAX_RESOLUTION or resolution & (resolution - 1)):
            raise ValueError(f"resolution must be a power of two >= 4 and <= {MAX_RESOLUTION}, got {resolution!r:.40}")

    @property
    def resolution_log2(self) -> int:
        return int(round(math.log2(self.resolution)))

    def channels(self, stage: int) -> int:
        """Feature maps `nf(stage)` of the official code; resolution 2**r uses stage r - 1."""
        return min(int(self.fmap_base / (2.0 ** (stage * self.fmap_decay))), self.fmap_max)


class EqualizedDense(nn.Module):
    """`dense` + `apply_bias` of the TF code: weight stored [out, in], scaled at run time."""

    def __init__(self, in_features: int, out_features: int, gain: float = ACTIVATION_GAIN,
                 use_wscale: bool = True, lrmul: float = 1.0, bias: bool = True) -> None:
        super().__init__()
        std = initial_std(in_features, gain, use_wscale, lrmul)
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.weight_coef = runtime_coef(in_features, gain, use_wscale, lrmul)
        self.bias_coef = lrmul  # TF multiplies the bias by lrmul only, never by the He constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # TF flattens NCHW maps in C, H, W order, as torch does
        bias = None if self.bias is None else self.bias * self.bias_coef
        return F.linear(x, self.weight * self.weight_coef, bias)


class EqualizedConv(nn.Module):
    """`conv2d`, `upscale2d_conv2d` or `conv2d_downscale2d` of the TF code, bias optional.

    `resample` is 'none', 'up' or 'down'; `fused` picks the single strided (transposed)
    conv over separate resampling, which is what the TF code does at >= 128 px.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, gain: float = ACTIVATION_GAIN,
                 use_wscale: bool = True, resample: str = "none", fused: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, not {resample!r}")
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {kernel}")
        fan_in = in_channels * kernel * kernel
        std = initial_std(fan_in, gain, use_wscale, 1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) * std)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_coef = runtime_coef(fan_in, gain, use_wscale, 1.0)
        self.resample = resample
        self.fused = fused and resample != "none"
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_coef
        if self.resample == "up" and self.fused:
            # The (k+1)-kernel with TF 'SAME' padding on the 2x output pads k//2 on each side.
            x = F.conv_transpose2d(x, fused_kernel(w).transpose(0, 1), stride=2, padding=self.padding)
        elif self.resample == "down" and self.fused:
            x = F.conv2d(x, fused_kernel(w) * 0.25, stride=2, padding=self.padding)
        else:
            if self.resample == "up":
                x = upscale2d(x)
            x = F.conv2d(x, w, padding=self.padding)
            if self.resample == "down":
                x = downscale2d(x)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1)
        return x


def uses_fused_scale(option: bool | str, resolution: int) -> bool:
    """The official `fused_scale='auto'` rule: fuse when the larger side of the resample is >= 128."""
    if option == "auto":
        return resolution >= 128
    if isinstance(option, bool):
        return option
    raise ValueError(f"fused_scale must be True, False or 'auto', not {option!r}")
