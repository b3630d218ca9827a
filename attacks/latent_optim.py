"""A batched Adam loop over latent tensors through frozen networks, and the freezing it needs.

Used by GAN inversion (one latent per image) and the exaggeration shift (one shared shift vector).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

# loss_fn(latents, step) -> per-sample losses [N] (each sample's latents independent) or a scalar.
LossFn = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
# callback(step, losses, latents), after the update of that step; losses are detached.
StepCallback = Callable[[int, torch.Tensor, dict[str, torch.Tensor]], None]
KEEP = ("best", "final")


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; both restored after it."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for module in modules:
            module.eval()
            module.requires_grad_(False)
        yield
    finally:
        for module, training, flags in saved:
            module.train(training)
            for param, flag in flags:
                param.requires_grad_(flag)


@dataclass
class LatentOptimResult:
    latents: dict[str, torch.Tensor]  # the kept latents (best or final), detached
    losses: torch.Tensor              # their loss: [N] per sample, or a scalar
    history: list[float]              # mean loss of every step, before its update
    steps: int


def _leaf(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)


def optimize_latents(init: Mapping[str, torch.Tensor], loss_fn: LossFn, steps: int, lr: float, *,
                     betas: tuple[float, float] = (0.9, 0.999), keep: str = "best",
                     callback: StepCallback | None = None,
                     device: str | torch.device | None = None,
                     after_backward: Callable[[list[torch.Tensor]], None] | None = None) -> LatentOptimResult:
    """Minimise `loss_fn` over copies of the `init` tensors with Adam; `init` is left untouched.

    A per-sample loss [N] is summed, so each sample's gradient (and, Adam being elementwise,
    its whole trajectory) is independent of the others in the batch; then `keep="best"` keeps
    each sample's best latents (rows of every tensor, whose first dimension must be N).
    A scalar loss — a shared latent over fresh batches — keeps the best or final tensors whole.
    Networks inside `loss_fn` should be `frozen` so gradients reach the latents only.
    `after_backward(tensors)` runs between each backward and its Adam update (e.g. to sum gradients over the
    ranks under torchrun, `common.distributed.all_reduce_grads`).
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = torch.device(device) if device is not None else None
    params = {name: _leaf(t, device) for name, t in init.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr, betas=betas)
    best: dict[str, torch.Tensor] = {}
    best_loss: torch.Tensor | None = None
    history: list[float] = []
    for step in range(steps + 1):
        # The last pass only scores the latents after the final update, so it needs no graph.
        with torch.set_grad_enabled(step < steps):
            losses = loss_fn(params, step)
        if losses.ndim > 1:
            raise ValueError(f"loss_fn must return [N] or a scalar, got shape {list(losses.shape)}")
        detached = losses.detach().float()
        best, best_loss = _keep(keep, params, detached, best, best_loss)
        if step == steps:
            break
        history.append(float(detached.mean()))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if after_backward is not None:
            after_backward(list(params.values()))
        optimizer.step()
        if callback is not None:
            callback(step, detached, {k: v.detach() for k, v in params.items()})
    return LatentOptimResult(best, best_loss, history, steps)


def _keep(keep: str, params: dict[str, torch.Tensor], losses: torch.Tensor, best: dict[str, torch.Tensor],
          best_loss: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    current = {k: v.detach().clone() for k, v in params.items()}
    if keep == "final" or best_loss is None:
        return current, losses.clone()
    if losses.ndim == 0:
        return (current, losses.clone()) if losses < best_loss else (best, best_loss)
    better = losses < best_loss  # NaN never wins, so a diverging sample keeps its last good latents
    for name, value in current.items():
        if value.shape[:1] != losses.shape:
            raise ValueError(f"per-sample loss of {losses.shape[0]} rows, but latent {name!r} is "
                             f"{list(value.shape)}")
        mask = better.reshape(-1, *([1] * (value.ndim - 1)))
        best[name] = torch.where(mask, value, best[name])
    return best, torch.where(better, losses, best_loss)
