"""The GAN losses a generator keeps training with while it is finetuned: WGAN-GP + drift for PGAN,
the non-saturating logistic loss + R1 for StyleGAN2, picked from the discriminator. Used by attacks.finetune.

A discriminator's score is the GAN's own (one unbounded number, high = real); the patch classifier's
label convention (common.labels: two logits, fake = 1) does not apply to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from patchscope.attacks.finetune_ddp import global_draw
from patchscope.common.errors import InputError
from patchscope.generators.pgan.tf import PGANTFDiscriminator
from patchscope.generators.pgan.zoo import PGANZooDiscriminator
from patchscope.generators.stylegan.discriminator import StyleGANDiscriminator
from patchscope.generators.stylegan2.model import StyleGAN2Discriminator
from patchscope.generators.training.losses import DRIFT, LAMBDA_GP, Critic, critic_loss, generator_loss


class GANObjective(Protocol):
    """What the finetuner needs of a GAN loss: a discriminator step, a generator loss, Adam settings."""

    name: str
    lr: float                        # the architecture's usual Adam learning rate
    betas: tuple[float, float]

    def discriminator_loss(self, critic: Critic, real: torch.Tensor, fake: torch.Tensor, step: int,
                           draws: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate into D, detached parts for the log)."""
        ...

    def generator_loss(self, fake_scores: torch.Tensor) -> torch.Tensor:
        ...

    def discriminator_optimizer(self, params: Iterable[nn.Parameter], lr: float,
                                betas: tuple[float, float]) -> torch.optim.Adam:
        ...

    def settings(self) -> dict[str, float | int | str]:
        ...


@dataclass
class WassersteinGP:
    """PGAN's loss (Karras et al.): E[D(fake)] − E[D(real)] + λ·GP + ε·E[D(real)²]; G maximises E[D(G(z))]."""

    lambda_gp: float = LAMBDA_GP
    drift: float = DRIFT
    name: str = "wgan-gp"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)

    def discriminator_loss(self, critic: Critic, real: torch.Tensor, fake: torch.Tensor, step: int,
                           draws: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The interpolation weights come from the step's own generator, so a resumed run draws the same.
        # Under torchrun: drawn for the global batch, this rank's rows kept (attacks.finetune_ddp).
        mix = global_draw(real.shape[0], lambda n: torch.rand(n, generator=draws)).to(real.device)
        loss = critic_loss(critic, real, fake, mix, self.lambda_gp, self.drift)
        return loss.total, loss.parts()

    def generator_loss(self, fake_scores: torch.Tensor) -> torch.Tensor:
        return generator_loss(fake_scores.float())

    def discriminator_optimizer(self, params: Iterable[nn.Parameter], lr: float,
                                betas: tuple[float, float]) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=lr, betas=betas)

    def settings(self) -> dict[str, float | int | str]:
        return {"objective": self.name, "lambda_gp": self.lambda_gp, "drift": self.drift}


def r1_penalty(critic: Critic, real: torch.Tensor) -> torch.Tensor:
    """Per-sample ||∇_x D(x)||² at the real images (Mescheder et al.); the graph is kept to train D."""
    points = real.detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(critic(points).float().sum(), points, create_graph=True)
    return gradients.flatten(1).square().sum(dim=1)


@dataclass
class LogisticR1:
    """StyleGAN2's loss: softplus(D(fake)) + softplus(−D(real)) + γ/2·||∇D(real)||²; G minimises
    softplus(−D(G(z))). With `r1_every` k > 1 the penalty is lazy: every k-th step, weighted k times,
    and D's Adam learning rate and betas are rescaled by k/(k+1) as in StyleGAN2."""

    r1_gamma: float = 10.0
    r1_every: int = 1
    name: str = "logistic-r1"
    lr: float = 2e-3
    betas: tuple[float, float] = (0.0, 0.99)

    def __post_init__(self) -> None:
        if self.r1_gamma < 0 or self.r1_every < 1:
            raise ValueError(f"expected r1_gamma >= 0 and r1_every >= 1, got {self.r1_gamma}, {self.r1_every}")

    def discriminator_loss(self, critic: Critic, real: torch.Tensor, fake: torch.Tensor, step: int,
                           draws: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real_scores, fake_scores = critic(real).float(), critic(fake.detach()).float()
        logistic = F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()
        total = logistic
        parts = {"loss_d": logistic.detach(), "real_score": real_scores.mean().detach(),
                 "fake_score": fake_scores.mean().detach()}
        if self.r1_gamma > 0 and step % self.r1_every == 0:
            penalty = r1_penalty(critic, real).mean()
            total = total + self.r1_gamma / 2 * penalty * self.r1_every
            parts["r1"] = penalty.detach()
            parts["loss_d"] = total.detach()
        return total, parts

    def generator_loss(self, fake_scores: torch.Tensor) -> torch.Tensor:
        return F.softplus(-fake_scores.float()).mean()

    def discriminator_optimizer(self, params: Iterable[nn.Parameter], lr: float,
                                betas: tuple[float, float]) -> torch.optim.Adam:
        ratio = self.r1_every / (self.r1_every + 1) if self.r1_every > 1 else 1.0
        return torch.optim.Adam(params, lr=lr * ratio, betas=(betas[0] ** ratio, betas[1] ** ratio))

    def settings(self) -> dict[str, float | int | str]:
        return {"objective": self.name, "r1_gamma": self.r1_gamma, "r1_every": self.r1_every}


def objective_for(discriminator: nn.Module | None, *, lambda_gp: float = LAMBDA_GP, drift: float = DRIFT,
                  r1_gamma: float = 10.0, r1_every: int = 1, generic: bool = False) -> GANObjective:
    """The loss the discriminator's GAN was trained with: WGAN-GP for a PGAN critic (zoo or official TF),
    logistic + R1 for a StyleGAN (v1, whose D_basic trained with it too) or StyleGAN2 discriminator. Another
    discriminator module is refused unless `generic` (one of the user's own, MODULE:CALLABLE): it then trains
    with the logistic loss + R1, which asks of it only a real-vs-fake score per image."""
    if isinstance(discriminator, (PGANZooDiscriminator, PGANTFDiscriminator)):
        return WassersteinGP(lambda_gp=lambda_gp, drift=drift)
    if isinstance(discriminator, (StyleGAN2Discriminator, StyleGANDiscriminator)) or (
            generic and isinstance(discriminator, nn.Module)):
        return LogisticR1(r1_gamma=r1_gamma, r1_every=r1_every)
    found = "no discriminator" if discriminator is None else f"a {type(discriminator).__name__}"
    raise InputError(f"finetuning continues GAN training, which needs the discriminator of a PGAN (zoo or "
                     f"official TF), a StyleGAN or a StyleGAN2; the generator has {found}")
