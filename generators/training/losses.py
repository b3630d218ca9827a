"""WGAN-GP losses of progressive GAN training: the critic's loss with gradient penalty and drift term,
and the generator's loss. Used by `generators.training.trainer` and by the finetune attack.

Averaged over the batch as in Karras et al. (pytorch_GAN_zoo sums the Wasserstein and drift
terms over the batch instead, which weighs the penalty batch-size times less).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LAMBDA_GP = 10.0  # gradient penalty weight (Gulrajani et al., Karras et al.)
DRIFT = 0.001     # epsilon_drift: keeps the critic's scores near zero (Karras et al.)

Critic = Callable[[torch.Tensor], torch.Tensor]  # images N x C x H x W -> scores N x 1


def interpolate(real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """`mix * real + (1 - mix) * fake` per sample (`mix`: N values in [0, 1])."""
    mix = mix.to(real.dtype).reshape(-1, *([1] * (real.dim() - 1)))
    return torch.lerp(fake, real, mix)


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor,
                     target: float = 1.0) -> torch.Tensor:
    """Per-sample `(||grad_x D(x)||_2 - target)^2 / target^2` at x on the segment real -> fake.

    The graph is kept (create_graph), so the penalty trains the critic. With minibatch
    stddev a sample's score depends on the others; like the reference code, the gradient
    of the summed scores is taken, cross terms included.
    """
    points = interpolate(real.detach(), fake.detach(), mix).requires_grad_(True)
    scores = critic(points)
    (gradients,) = torch.autograd.grad(scores.sum(), points, create_graph=True)
    norms = gradients.flatten(1).norm(dim=1)
    return (norms - target).square() / target ** 2


def drift_penalty(real_scores: torch.Tensor) -> torch.Tensor:
    """Per-sample `D(real)^2`: without it WGAN scores wander away from zero."""
    return real_scores.flatten(1)[:, 0].square()


@dataclass
class CriticLoss:
    """The critic's loss and its parts, each a batch mean (`total` is what to back-propagate)."""

    total: torch.Tensor
    real_score: torch.Tensor   # mean D(real)
    fake_score: torch.Tensor   # mean D(fake)
    penalty: torch.Tensor | None  # mean gradient penalty before lambda (None: not computed this step)
    drift: torch.Tensor           # mean D(real)^2, before epsilon

    def parts(self) -> dict[str, torch.Tensor]:
        """Detached parts for logging; `wasserstein` is D(real) - D(fake)."""
        parts = {"loss_d": self.total.detach(), "wasserstein": (self.real_score - self.fake_score).detach(),
                 "drift": self.drift.detach()}
        if self.penalty is not None:
            parts["gradient_penalty"] = self.penalty.detach()
        return parts


def critic_loss(critic: Critic, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor,
                lambda_gp: float = LAMBDA_GP, drift: float = DRIFT) -> CriticLoss:
    """`E[D(fake)] - E[D(real)] + lambda_gp * E[(||grad D(x_mix)|| - 1)^2] + drift * E[D(real)^2]`.

    Real, fake and interpolated batches go through the critic separately, so minibatch
    stddev sees groups of one kind only, as in the reference implementations. With
    `lambda_gp` 0 the penalty is not computed (lazy regularisation skips it on most steps).
    """
    real_scores = critic(real)
    fake_scores = critic(fake.detach())
    drift_term = drift_penalty(real_scores).mean()
    real_mean, fake_mean = real_scores[:, 0].mean(), fake_scores[:, 0].mean()
    total = fake_mean - real_mean + drift * drift_term
    penalty = None
    if lambda_gp > 0:
        penalty = gradient_penalty(critic, real, fake, mix).mean()
        total = total + lambda_gp * penalty
        penalty = penalty.detach()
    return CriticLoss(total, real_mean.detach(), fake_mean.detach(), penalty, drift_term.detach())


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """`-E[D(G(z))]`: the generator raises the critic's score of its samples."""
    return -fake_scores[:, 0].mean()
