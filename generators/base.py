"""The Generator interface every architecture implements.

Used by sampling, GAN inversion and the attacks: latents in, `N x 3 x R x R`
images in about [-1, 1] out, with the discriminator attached when the file has one.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

NOISE_MODES = ("const", "random", "none")


class Generator(nn.Module):
    """A face generator. Subclasses set `latent_dim`, `resolution` and implement `forward`."""

    latent_dim: int
    resolution: int
    format: str = "unknown"  # the checkpoint format it was read from

    def __init__(self) -> None:
        super().__init__()
        self.discriminator: nn.Module | None = None

    def sample_latents(self, n: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        """Latents `start .. start+n-1` of the stream for `seed`: row i depends on (seed, i) only.

        The stream is `numpy.random.RandomState(seed).randn`, drawn row by row, as the
        paper's sampling scripts do, so any slice of it is the same whatever the batching.
        """
        rng = np.random.RandomState(seed)
        rows = rng.randn(start + n, self.latent_dim)[start:]
        return torch.from_numpy(rows.astype(np.float32))

    def forward(self, z: torch.Tensor, **opts: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Plain facts for logs and manifests."""
        return {
            "class": type(self).__name__,
            "format": self.format,
            "latent_dim": self.latent_dim,
            "resolution": self.resolution,
            "has_discriminator": self.discriminator is not None,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


class StyleGenerator(Generator):
    """A generator with a mapping network z -> w and a synthesis network w -> image.

    `psi` and `truncation_cutoff` truncate w toward the stored average `w_avg` on the
    first `truncation_cutoff` layers (all when None; StyleGAN v1 reads None as none, as TF's
    `G_style` does); `noise_mode` picks the per-layer
    noise: the stored constant maps, fresh random noise, or none.
    """

    w_dim: int
    num_ws: int  # how many per-layer w vectors synthesis takes

    def __init__(self, psi: float = 1.0, truncation_cutoff: int | None = None,
                 noise_mode: str = "const") -> None:
        super().__init__()
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
        self.psi = psi
        self.truncation_cutoff = truncation_cutoff
        self.noise_mode = noise_mode

    def mapping(self, z: torch.Tensor, psi: float | None = None,
                truncation_cutoff: int | None = None) -> torch.Tensor:  # pragma: no cover
        """z [N, latent_dim] -> ws [N, num_ws, w_dim], truncated."""
        raise NotImplementedError

    def synthesis(self, ws: torch.Tensor, noise_mode: str | None = None) -> torch.Tensor:  # pragma: no cover
        """ws [N, num_ws, w_dim] (or [N, w_dim], broadcast) -> images."""
        raise NotImplementedError

    def truncate(self, ws: torch.Tensor, w_avg: torch.Tensor, psi: float | None,
                 truncation_cutoff: int | None) -> torch.Tensor:
        psi = self.psi if psi is None else psi
        cutoff = self.truncation_cutoff if truncation_cutoff is None else truncation_cutoff
        if psi == 1:
            return ws
        cutoff = ws.shape[1] if cutoff is None else cutoff
        out = ws.clone()
        # under autocast the mapping's ws are bf16 while w_avg stays a float32 buffer
        out[:, :cutoff] = w_avg.to(ws.dtype).lerp(ws[:, :cutoff], psi)
        return out

    def forward(self, z: torch.Tensor, psi: float | None = None, truncation_cutoff: int | None = None,
                noise_mode: str | None = None, **opts: Any) -> torch.Tensor:
        return self.synthesis(self.mapping(z, psi, truncation_cutoff), noise_mode=noise_mode)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "w_dim": self.w_dim, "num_ws": self.num_ws, "psi": self.psi,
                "truncation_cutoff": self.truncation_cutoff, "noise_mode": self.noise_mode}
