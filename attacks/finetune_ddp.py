"""Generator finetuning under `torchrun`: each rank's slice of a step's global batch, losses that are means over the
global batch, gradients summed over the ranks; and the run's bookkeeping (`Run`), whose log rank 0 alone writes.

Every rank keeps identical G, D, EMA and optimiser states. A step draws its latents, real-image indices, flips and
gradient-penalty weights for the GLOBAL batch from the step's own generator, exactly as one process does, and each
rank keeps its contiguous slice of rows (`local`). Every GAN, classifier and anchor term is a mean over the rows of a
batch, so each rank scales its total loss by slice/batch (`share`): summed over the ranks these are the means over the
global batch, and summing the gradients of G and D over the ranks after each backward (`sync_gradients`), before the
Adam steps, gives the gradients of one process (up to the order of the additions).

DistributedDataParallel is not used: its gradient hooks do not support the double backward (create_graph=True) of
WGAN-GP's gradient penalty and StyleGAN2's R1, so the gradients are all-reduced by hand.
Minibatch-stddev groups are formed within each rank's slice (as in NVlabs' multi-GPU training): with PGAN's groups
of 4, a per-rank batch that is a multiple of 4 gives the single-process discriminator outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from patchscope.attacks.finetune_files import METRICS_FILE, RESUME_FILE, committed, forget, recover
from patchscope.common import distributed
from patchscope.common.atomic import append_line


@dataclass
class Run:
    """One `GeneratorFinetuner.run` call: its schedule, its output folder and the log so far."""

    steps: int
    batch: int
    seed: int
    out: Path | None
    checkpoint_every: int
    log_every: int
    eval_n: int
    eval_seed: int
    settings: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out is not None and distributed.is_main():
            self.write(json.dumps(record))

    def write(self, line: str) -> None:
        append_line(self.out / METRICS_FILE, line)


def local(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """This rank's contiguous slice of the `batch` rows drawn for the global batch (all of them in one process)."""
    start, n = distributed.share_of(batch, "batch")
    return rows if n == batch else rows[start:start + n]


def global_draw(n_local: int, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """`draw(global rows)` sliced to this rank's `n_local` rows: every rank consumes the step's random stream as one
    process does."""
    world = distributed.world_size()
    rows = draw(n_local * world)
    return rows if world == 1 else rows[distributed.rank() * n_local:(distributed.rank() + 1) * n_local]


def share(batch: int) -> float:
    """This rank's part of a mean over the global batch: slice/batch (1 in one process)."""
    return distributed.share_of(batch, "batch")[1] / batch


def scaled(loss: torch.Tensor, batch: int) -> torch.Tensor:
    """A mean over this rank's slice as its share of the mean over the global batch (the loss itself alone)."""
    part = share(batch)
    return loss if part == 1 else loss * part


def sync_gradients(*modules: nn.Module | None) -> None:
    """Sum the gradients of the modules' parameters over the ranks (after a backward, before the optimiser step)."""
    for module in modules:
        if module is not None:
            distributed.all_reduce_grads(module.parameters())


def reduce_losses(losses: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """Detached batch means of this rank's slice -> the means over the global batch, alike on every rank (so the
    divergence guard decides alike everywhere)."""
    if distributed.world_size() == 1 or not losses:
        return losses
    names = list(losses)
    summed = distributed.all_reduce_sum(torch.stack([losses[k].float() * share(batch) for k in names]))
    return dict(zip(names, summed))


def batch_mean(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """The mean over the global batch of rows each rank holds a slice of (dim 0)."""
    if distributed.world_size() == 1:
        return rows.mean(dim=0)
    return distributed.all_reduce_sum(rows.sum(dim=0)) / batch


def settle(out: Path, resume: bool, step: int) -> str | None:
    """Rank 0: OUT made, and as its last commit says; what a resume reads ("commit", or "resume.pt" of a run saved
    before checkpoints were commits), or None for a fresh start (then nothing of an older run is left)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume and committed(out):
        recover(out)  # a checkpoint cut short is rolled back (not committed) or forward (committed)
        return "commit"
    if resume and (out / RESUME_FILE).exists():
        return "resume.pt"
    if step == 0:
        forget(out)  # a fresh run: no files or log lines of an older one, nor of one never committed
    return None
