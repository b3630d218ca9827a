"""Training losses by name: the paper's patch cross entropy, and the squared error MesoInception-4 was trained with.

Used by `forensics.train`, which takes the loss a model names in its `loss` attribute.
"""
from __future__ import annotations

from typing import Callable

import torch

from patchscope.common.labels import p_fake
from patchscope.forensics.scoring import patch_cross_entropy

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def patch_squared_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over images and patches of (P(fake) - label)^2: Keras' `mean_squared_error` on a sigmoid output,
    since P(fake) of the pair [0, z] is sigmoid(z)."""
    if logits.dim() != 4 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected N x 2 x H x W logits and N labels, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    probs = p_fake(logits.float())
    return (probs - labels.to(probs)[:, None, None]).square().mean()


LOSSES: dict[str, LossFunction] = {"ce": patch_cross_entropy, "mse": patch_squared_error}


def loss_for(model: torch.nn.Module) -> LossFunction:
    """The loss a model is trained with (its `loss` attribute; cross entropy when it names none)."""
    name = getattr(model, "loss", "ce")
    if name not in LOSSES:
        raise ValueError(f"{getattr(model, 'name', 'model')}: unknown loss {name!r}; expected one of "
                         f"{', '.join(LOSSES)}")
    return LOSSES[name]
