"""The invertible pieces of Glow: actnorm, 1x1 convolutions, couplings, squeeze and split priors.

Used by `generators.glow.model`; attribute names follow y0ast Glow-PyTorch so its state dicts load strictly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)
# openai and y0ast scale zero-initialised convolutions by exp(3 * logs): the factor
# lets the scale move faster than the weights under the same learning rate.
ZERO_CONV_LOGSCALE = 3.0
# Affine coupling scale is sigmoid(h + 2), which starts near 0.88 and never reaches 0.
AFFINE_SCALE_SHIFT = 2.0


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Per-image log N(x; mean, exp(logs)^2), summed over C, H, W."""
    logp = -0.5 * (2.0 * logs + (x - mean) ** 2 * torch.exp(-2.0 * logs) + LOG_2PI)
    return logp.flatten(1).sum(1)


def split_halves(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second half of the channels (y0ast's "split")."""
    c = h.shape[1] // 2
    return h[:, :c], h[:, c:]


def split_alternate(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Even and odd channels (y0ast's "cross"), used for (mean, logs) and (shift, scale) pairs."""
    return h[:, 0::2], h[:, 1::2]


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; channel c*4 + dy*2 + dx holds pixel (2y+dy, 2x+dx)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `squeeze`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class Squeeze(nn.Module):
    """A parameter-free layer, kept in the layer list so indices match y0ast's `flow.layers.N`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze(x)

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        return unsqueeze(z)


class ActNorm(nn.Module):
    """Per-channel affine map `(x + bias) * exp(logs)`; its log-det is `H*W*sum(logs)`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = self.logs.sum() * (x.shape[2] * x.shape[3])
        return (x + self.bias) * torch.exp(self.logs), logdet

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.exp(-self.logs) - self.bias


class InvertibleConv1x1(nn.Module):
    """A learned channel mixing `W`, either stored whole or as `P L (U + diag(sign_s * exp(log_s)))`.

    The LU form makes log|det W| a plain sum of `log_s`; `p` and `sign_s` are fixed buffers.
    """

    def __init__(self, channels: int, lu_decomposed: bool) -> None:
        super().__init__()
        self.lu_decomposed = lu_decomposed
        w = torch.empty(channels, channels)
        if w.device.type != "meta":
            w = torch.linalg.qr(torch.randn(channels, channels, device=w.device))[0]
        if not lu_decomposed:
            self.weight = nn.Parameter(w)
            return
        # Registration order (parameters, then buffers) reproduces y0ast's key order.
        self.lower = nn.Parameter(torch.empty_like(w))
        self.log_s = nn.Parameter(torch.empty(channels, device=w.device))
        self.upper = nn.Parameter(torch.empty_like(w))
        self.register_buffer("p", torch.empty_like(w))
        self.register_buffer("sign_s", torch.empty(channels, device=w.device))
        if w.device.type != "meta":
            self.set_from_matrix(w)

    @torch.no_grad()
    def set_from_matrix(self, w: torch.Tensor) -> None:
        """Fill the LU factors so that the layer computes `w`."""
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.p.copy_(p)
        self.lower.copy_(lower)
        self.upper.copy_(torch.triu(upper, 1))
        self.sign_s.copy_(torch.sign(s))
        self.log_s.copy_(torch.log(torch.abs(s)))

    def matrix_and_logabsdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`W` and log|det W| (per pixel)."""
        if not self.lu_decomposed:
            # float64 keeps the log-det and the inverse exact enough for wide layers.
            return self.weight, torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)
        lower = torch.tril(self.lower, -1) + torch.eye(self.lower.shape[0], device=self.lower.device,
                                                       dtype=self.lower.dtype)
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, logabsdet = self.matrix_and_logabsdet()
        return F.conv2d(x, w[:, :, None, None]), logabsdet * (x.shape[2] * x.shape[3])

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        w, _ = self.matrix_and_logabsdet()
        w_inv = torch.linalg.inv(w.double()).to(z.dtype)
        return F.conv2d(z, w_inv[:, :, None, None])


class ChannelReversal(nn.Module):
    """y0ast's `flow_permutation="reverse"`: a fixed channel flip with log-det 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flip(1), x.new_zeros(())

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        return z.flip(1)


class HiddenConv(nn.Module):
    """A bias-free convolution followed by actnorm (y0ast's `Conv2d` with `do_actnorm=True`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        if self.conv.weight.device.type != "meta":
            nn.init.normal_(self.conv.weight, std=0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actnorm(self.conv(x))[0]


class ZeroConv(nn.Module):
    """A 3x3 convolution, zero at init, whose output is scaled by `exp(3 * logs)` per channel."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if self.conv.weight.device.type != "meta":
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * ZERO_CONV_LOGSCALE)


def build_coupling_net(in_channels: int, out_channels: int, hidden_channels: int) -> nn.Sequential:
    """3x3 conv, ReLU, 1x1 conv, ReLU, zero conv; indices 0, 2, 4 carry the weights."""
    return nn.Sequential(
        HiddenConv(in_channels, hidden_channels, 3),
        nn.ReLU(),
        HiddenConv(hidden_channels, hidden_channels, 1),
        nn.ReLU(),
        ZeroConv(hidden_channels, out_channels),
    )


class FlowStep(nn.Module):
    """actnorm -> channel mixing -> coupling; the second channel half is moved conditioned on the first.

    Additive coupling: `z2 + net(z1)` (volume preserving). Affine: `h = net(z1)`,
    `shift, s = h[0::2], h[1::2]`, `z2 = (z2 + shift) * sigmoid(s + 2)`.
    """

    def __init__(self, channels: int, hidden_channels: int, coupling: str, permutation: str,
                 lu_decomposed: bool) -> None:
        super().__init__()
        self.coupling = coupling
        self.actnorm = ActNorm(channels)
        # One attribute per kind, never an alias: a second name would duplicate state-dict keys.
        if permutation == "invconv":
            self.invconv = InvertibleConv1x1(channels, lu_decomposed)
        else:
            self.reversal = ChannelReversal()  # holds no weights, as in y0ast
        out = channels // 2 if coupling == "additive" else channels
        self.block = build_coupling_net(channels // 2, out, hidden_channels)

    def _mixing(self) -> InvertibleConv1x1 | ChannelReversal:
        return self.invconv if hasattr(self, "invconv") else self.reversal

    def _shift_and_scale(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, s = split_alternate(self.block(z1))
        return shift, torch.sigmoid(s + AFFINE_SCALE_SHIFT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (z, per-image log|det dz/dx|)."""
        z, logdet = self.actnorm(x)
        z, mixing_logdet = self._mixing()(z)
        logdet = (logdet + mixing_logdet).expand(x.shape[0])
        z1, z2 = split_halves(z)
        if self.coupling == "additive":
            z2 = z2 + self.block(z1)
        else:
            shift, scale = self._shift_and_scale(z1)
            z2 = (z2 + shift) * scale
            logdet = logdet + torch.log(scale).flatten(1).sum(1)
        return torch.cat((z1, z2), 1), logdet

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = split_halves(z)
        if self.coupling == "additive":
            z2 = z2 - self.block(z1)
        else:
            shift, scale = self._shift_and_scale(z1)
            z2 = z2 / scale - shift
        x = self._mixing().reverse(torch.cat((z1, z2), 1))
        return self.actnorm.reverse(x)


class SplitPrior(nn.Module):
    """Factors out half the channels; the kept half predicts their Gaussian (mean, logs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ZeroConv(channels // 2, channels)

    def prior(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logs) of the factored-out half given the kept half."""
        return split_alternate(self.conv(z1))
