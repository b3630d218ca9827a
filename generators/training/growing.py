"""A progressive GAN being grown: pytorch_GAN_zoo generator, its moving average (avgG) and
discriminator, their Adam optimizers, one WGAN-GP training step, and growth by one scale.

Used by `generators.training.trainer`; weights of each new scale come from a seed derived from
(seed, scale), so rebuilding a run for resume gives the same networks.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from patchscope.common.seeding import cpu_seeded
from patchscope.generators.pgan.zoo import PGANZooDiscriminator, PGANZooGenerator, build_pgan_zoo
from patchscope.generators.training.losses import critic_loss, generator_loss
from patchscope.generators.training.schedule import INIT, derive_seed


class GrowingGAN:
    """Generator, averaged generator and discriminator at the current scale, with their optimizers.

    As in pytorch_GAN_zoo, growing by a scale restarts the Adam states and the average
    from the current generator (the zoo rebuilds both in `updateSolversDevice`).
    """

    def __init__(self, depths: Sequence[int], latent_dim: int, seed: int, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.0, 0.99), ema_beta: float = 0.999,
                 device: torch.device | str = "cpu", channels_last: bool = False) -> None:
        self.depths = list(depths)
        self.seed = seed
        self.lr, self.betas, self.ema_beta = lr, (float(betas[0]), float(betas[1])), ema_beta
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with cpu_seeded(derive_seed(seed, INIT, 0)):
            generator, discriminator = build_pgan_zoo(4, latent_dim, self.depths[0], [])
        self.generator: PGANZooGenerator = generator
        self.discriminator: PGANZooDiscriminator = discriminator
        self._settle()

    @property
    def scale(self) -> int:
        """Index of the current scale (0: 4 px)."""
        return len(self.generator.scaleLayers)

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    def _settle(self) -> None:
        """Place the networks, restart the average and the optimizers (after building or growing)."""
        self.generator.to(self.device, memory_format=self.memory_format)
        self.discriminator.to(self.device, memory_format=self.memory_format)
        self.average = copy.deepcopy(self.generator).requires_grad_(False)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas)

    def grow(self) -> None:
        """Add the next scale to the generator and the discriminator."""
        if self.scale + 1 >= len(self.depths):
            raise ValueError(f"already at the final scale ({self.resolution} px)")
        depth = self.depths[self.scale + 1]
        with cpu_seeded(derive_seed(self.seed, INIT, self.scale + 1)):
            self.generator.add_scale(depth)
            self.discriminator.add_scale(depth)
        self._settle()

    def set_alpha(self, alpha: float) -> None:
        """Fade-in weight of the previous scale; kept on the networks so snapshots record it."""
        self.generator.alpha = self.average.alpha = self.discriminator.alpha = alpha

    def train_step(self, real: torch.Tensor, z_critic: torch.Tensor, z_generator: torch.Tensor,
                   mix: torch.Tensor, lambda_gp: float, drift: float) -> dict[str, torch.Tensor]:
        """One critic step (WGAN-GP + drift), one generator step, one average update; the
        detached losses, left on the device (no host sync per step)."""
        generator, discriminator = self.generator, self.discriminator
        with torch.no_grad():
            fake = generator(z_critic)
        loss = critic_loss(discriminator, real, fake, mix, lambda_gp, drift)
        self.optimizer_d.zero_grad(set_to_none=True)
        loss.total.backward()
        self.optimizer_d.step()
        # The generator's step needs gradients through D, not for D's own weights.
        discriminator.requires_grad_(False)
        try:
            loss_g = generator_loss(discriminator(generator(z_generator)))
            self.optimizer_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.optimizer_g.step()
        finally:
            discriminator.requires_grad_(True)
        self.update_average()
        return {**loss.parts(), "loss_g": loss_g.detach()}

    @torch.no_grad()
    def update_average(self) -> None:
        for average, current in zip(self.average.parameters(), self.generator.parameters()):
            average.lerp_(current, 1.0 - self.ema_beta)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the three networks and both optimizer states."""
        return {"scale": self.scale, "alpha": float(self.generator.alpha),
                "netG": self.generator.state_dict(), "netD": self.discriminator.state_dict(),
                "avgG": self.average.state_dict(), "optimizer_g": self.optimizer_g.state_dict(),
                "optimizer_d": self.optimizer_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Grow to the saved scale, then take the saved weights and optimizer states."""
        while self.scale < int(state["scale"]):
            self.grow()
        self.generator.load_state_dict(state["netG"])
        self.discriminator.load_state_dict(state["netD"])
        self.average.load_state_dict(state["avgG"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.set_alpha(float(state["alpha"]))
