"""The label convention, in one place: real = 0, fake = 1.

A patch classifier outputs two logits per patch, N x 2 x H' x W' (a full-image classifier N x 2),
channel REAL first and channel FAKE second; P(fake) is the softmax probability of the fake channel.
Dataset labels, loss targets, metrics (fake is the positive class) and the attacks' targets
(exaggeration pushes towards FAKE, finetuning towards REAL) all use these numbers.

The helpers keep the exact arithmetic every caller used before they were gathered here
(softmax then the fake channel, a strict `fake > real` comparison), so results are bit-identical.
"""
from __future__ import annotations

import torch

REAL = 0
FAKE = 1
NUM_CLASSES = 2                  # logits per patch: [real, fake]
LABEL_NAMES = ("real", "fake")   # LABEL_NAMES[label]
LABELS = (REAL, FAKE)            # the valid labels, in LABEL_NAMES order


def p_fake(logits: torch.Tensor) -> torch.Tensor:
    """P(fake) of every logit pair: softmax over dim 1 (the class axis), fake channel.

    N x 2 x H x W -> N x H x W, N x 2 -> N; computed in the logits' dtype (cast before for float32).
    """
    return torch.softmax(logits, dim=1)[:, FAKE]


def fake_wins(logits: torch.Tensor) -> torch.Tensor:
    """Boolean map (logits without the class axis): the fake logit is strictly larger; a tie counts as real."""
    return logits[:, FAKE] > logits[:, REAL]


def targets(n: int, label: int, device: str | torch.device | None = None) -> torch.Tensor:
    """`n` copies of `label` (REAL or FAKE) as int64, the class targets of a batch of one kind."""
    if label not in LABELS:
        raise ValueError(f"label must be {REAL} (real) or {FAKE} (fake), got {label!r}")
    return torch.full((n,), label, dtype=torch.long, device=device)


def patch_targets(labels: torch.Tensor, height: int, width: int,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Every patch of an H x W logit map gets its image's label: N labels -> N x H x W int64.

    `expand` makes a view, so no N x H x W tensor is built up front.
    """
    n = labels.shape[0]
    return labels.to(device=device, dtype=torch.long)[:, None, None].expand(n, height, width)
