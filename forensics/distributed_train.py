"""Classifier training under `torchrun` (DistributedDataParallel): the per-rank batch, BatchNorm across ranks, DDP.

`forensics.train.fit` runs unchanged in every process torchrun starts. `--batch-size` stays the GLOBAL batch:
each of the W ranks trains on a disjoint 1/W of every global batch (`batching.BalancedBatchSampler`), and DDP
averages the gradients, so a step sees the images one process would see with the same batch size. BatchNorm
normalises each rank's share on its own unless `sync_bn` makes it use the statistics of the whole global batch:
torch's SyncBatchNorm on CUDA, `SyncedBatchNorm` below elsewhere (torch's has no CPU kernel).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from patchscope.common import distributed


def with_world_size(config: Any) -> Any:
    """`config` with `world_size` set to this launch's (a value it carries, e.g. copied from a run trained under
    torchrun by retrain or a reused config.yaml, is a record of that run and is replaced); a global batch the
    ranks cannot split evenly (each rank needs an even share: half real, half fake) is refused on every rank
    alike, before any process waits."""
    world = distributed.world_size()
    distributed.check_global_batch(config.batch_size, 2, " with half real and half fake images on each")
    return dataclasses.replace(config, world_size=world)


def per_rank_batch(config: Any) -> int:
    return config.batch_size // distributed.world_size()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the upstream gradients (each rank's input
    feeds every rank's output)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(grad.contiguous().clone())


class _Synced:
    """BatchNorm whose training statistics are those of the whole global batch: sums over every rank, through a
    differentiable all-reduce, so gradients flow back to every rank's images as in one process."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Module's name)
        if not (self.training and distributed.active()):
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count.detach()]))
        n = total[-1].detach()
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


class SyncedBatchNorm1d(_Synced, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_Synced, nn.BatchNorm2d):
    pass


class SyncedBatchNorm3d(_Synced, nn.BatchNorm3d):
    pass


_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d, nn.BatchNorm3d: SyncedBatchNorm3d}


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers that normalise over the global batch (only under torchrun with more than one process).

    Parameters and buffers stay the same tensors under the same names, so checkpoints do not change.
    """
    if distributed.world_size() == 1:
        return model
    if device.type == "cuda":  # torch's, over NCCL or (on shared GPUs) gloo
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in _SYNCED:
            module.__class__ = _SYNCED[type(module)]
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module a training step calls: DistributedDataParallel around `model` under torchrun, else `model`."""
    if distributed.world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank (without sync_bn each rank's last step updated its own),
    so every rank validates the model rank 0 saves."""
    if distributed.active():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
