"""The settings of eq. 4's finetuning, the moving-average rule, the divergence guard, and the anchor that stands in
for a missing discriminator: without one, G is kept near the frozen original G0 by LPIPS and/or L2 between G(z) and
G0(z). Used by attacks.finetune.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from patchscope.common.checks import check_bool, check_choice, check_float, check_int
from patchscope.common.errors import InputError
from patchscope.forensics.scoring import AGGREGATIONS

log = logging.getLogger("patchscope.finetune")

ANCHORS = ("lpips", "l2", "lpips+l2")


class ANCHOR_ADAM:  # noqa: N801 - a constant: Adam of the generator when no GAN objective brings its own (PGAN's)
    lr, betas = 1e-3, (0.0, 0.99)


# The default moving average: its half-life is EMA_SHARE of the run's steps, beta within EMA_RANGE.
EMA_SHARE, EMA_RANGE = 0.1, (0.9, 0.999)


def default_ema_beta(steps: int) -> float:
    """beta = 0.5 ** (1 / (0.1 · steps)), clamped to [0.9, 0.999] and rounded to 6 decimals: the average forgets
    half of what it held in a tenth of the run (300 steps: 0.97716; 1000: 0.993092; 6929 or more: 0.999)."""
    half_life = EMA_SHARE * steps
    beta = 0.5 ** (1 / half_life) if half_life > 0 else 0.0
    return round(min(max(beta, EMA_RANGE[0]), EMA_RANGE[1]), 6)


def ema_half_life(beta: float) -> float:
    """Steps after which the average keeps half of a weight it held: log 0.5 / log beta."""
    return 0.0 if beta <= 0 else math.log(0.5) / math.log(beta)


def warn_slow_average(beta: float, steps: int) -> None:
    """Warn when an explicit beta gives the average a half-life longer than the whole run."""
    half_life = ema_half_life(beta)
    if steps > 0 and half_life > steps:
        log.warning("ema_beta %g: the moving average's half-life is %.0f steps, longer than this %d-step run, so "
                    "the saved generator stays close to the original; leave ema_beta unset to scale it with the "
                    "steps", beta, half_life, steps)


def divergence(losses: dict[str, torch.Tensor], max_loss: float, step: int) -> str | None:
    """Why step `step`'s losses are unusable (non-finite, or a total above max_loss), or None."""
    names = list(losses)
    values = torch.stack([losses[k].float().reshape(()) for k in names])
    bounded = torch.tensor([k in ("loss_d", "loss_g") for k in names], device=values.device)
    bad = ~torch.isfinite(values) | (bounded & (values.abs() > max_loss))
    if not bool(bad.any()):  # the step's one host sync
        return None
    name = names[int(bad.nonzero()[0])]
    value = float(values[names.index(name)])
    kind = "is not finite" if not torch.isfinite(torch.tensor(value)) else f"exceeds max_loss {max_loss:g}"
    return f"{name} = {value:g} {kind} at step {step + 1}"


@dataclass
class FinetuneSettings:
    """The numbers of eq. 4's finetuning; `GeneratorFinetuner` takes the networks and data beside them."""

    classifier_weight: float = 1.0      # weight w of L_real(G, C) beside the GAN loss
    lr: float | None = None             # Adam lr of G and D (None: the objective's: 1e-3 PGAN, 2e-3 StyleGAN2)
    betas: tuple[float, float] | None = None  # Adam betas (None: the objective's)
    n_critic: int = 1                   # discriminator updates per generator update
    ema_beta: float | None = None       # moving average of the generator, what is saved (None: default_ema_beta)
    mirror: bool = True                 # flip half the real images left-right
    max_loss: float = 1e4               # divergence guard: a D or G loss above this stops the run
    aggregation: str = "after_softmax"  # image P(fake) in the log and comparisons
    precision: str = "fp32"             # fp32 | bf16 autocast (resolve auto with common.device first)
    eval_batch: int = 16                # samples per classifier call when judging
    anchor: str = "lpips"               # without a discriminator: lpips | l2 | lpips+l2 between G(z) and G0(z)
    anchor_weight: float = 1.0          # its weight beside the classifier loss

    def __post_init__(self) -> None:
        check_float(self, "classifier_weight", 0)
        check_float(self, "lr", 0, low_open=True, optional=True)
        if self.betas is not None:
            if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                               for b in self.betas)):
                raise InputError(f"setting betas={self.betas!r}: expected two numbers >= 0 and < 1, or null")
            self.betas = (float(self.betas[0]), float(self.betas[1]))
        check_int(self, "n_critic", 1)
        check_float(self, "ema_beta", 0, 1, high_open=True, optional=True)
        check_bool(self, "mirror")
        check_float(self, "max_loss", 0, low_open=True)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_choice(self, "precision", ("fp32", "bf16"))
        check_int(self, "eval_batch", 1)
        check_choice(self, "anchor", ANCHORS)
        check_float(self, "anchor_weight", 0)


class Anchor:
    """anchor_weight · (LPIPS and/or mean squared error) between G(z) and the frozen original's G0(z)."""

    def __init__(self, kind: str, weight: float, lpips: nn.Module | None) -> None:
        if kind not in ANCHORS:
            raise InputError(f"anchor {kind!r}: expected one of {', '.join(ANCHORS)}")
        if "lpips" in kind and lpips is None:
            raise InputError(f"anchor {kind}: the generator has no discriminator and LPIPS has no backbone weights; "
                             f"pass --lpips-weights FILE (or --lpips-random for smoke tests), or --anchor l2")
        self.kind, self.weight, self.lpips = kind, float(weight), lpips if "lpips" in kind else None

    def describe(self) -> str:
        what = " + ".join("LPIPS" if part == "lpips" else "L2" for part in self.kind.split("+"))
        return f"{what} to G0(z), weight {self.weight:g}"

    def loss(self, fake: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the unweighted anchor loss, its detached parts) of images in [-1, 1]."""
        parts: dict[str, torch.Tensor] = {}
        terms = []
        if self.lpips is not None:
            terms.append(self.lpips(fake, target).float().mean())
            parts["anchor_lpips"] = terms[-1].detach()
        if "l2" in self.kind:
            terms.append((fake.float() - target.float()).square().mean())
            parts["anchor_l2"] = terms[-1].detach()
        return sum(terms[1:], terms[0]), parts

    def settings(self) -> dict[str, float | str | None]:
        return {"objective": "anchor", "anchor": self.kind, "anchor_weight": self.weight,
                "anchor_lpips": None if self.lpips is None else getattr(self.lpips, "source", "given")}
