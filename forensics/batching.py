"""Balanced, reproducible batches: samplers and the DataLoader that feeds training and evaluation.

Used through `forensics.data` (re-exported there); the order of every batch depends only on (seed, epoch).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from patchscope.common.errors import InputError
from patchscope.forensics.device_crop import UncroppedItems, collate_uncropped, resolve_crop_on


def _cycled_permutations(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` indices from back-to-back fresh permutations of range(n)."""
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(length / n))])[:length]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of batch_size/2 real and batch_size/2 fake indices; an epoch covers the larger class once.

    The order depends only on (seed, epoch). The smaller class cycles through fresh
    permutations; the final batch is topped up from the larger class's next permutation,
    so every batch has the same size. With world_size > 1, rank r takes batches r, r+W, ...
    (the distributed sampler's sharding for torchrun DDP): the shards interleave back into the
    single-process epoch, and every rank gets the same number of batches, the last ones continuing
    the permutations to pad (as torch's DistributedSampler pads) so no rank waits on another.
    Under DDP `batch_size` is the per-rank batch (global batch / W): step s then trains on batches
    sW..sW+W-1, whose images are exactly batch s of one process with the global batch size, and the
    epochs have the same number of steps (ceil(ceil(n / h) / W) = ceil(n / (h W))).
    """

    def __init__(self, n_real: int, n_fake: int, batch_size: int, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if batch_size < 2 or batch_size % 2:
            raise InputError(f"batch_size must be even (half real, half fake), got {batch_size}")
        if n_real < 1 or n_fake < 1:
            raise InputError(f"balanced batches need real and fake images, got {n_real} real and {n_fake} fake")
        self.n_real, self.n_fake, self.half, self.seed = n_real, n_fake, batch_size // 2, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self._per_rank = math.ceil(math.ceil(max(n_real, n_fake) / self.half) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._per_rank

    def __iter__(self) -> Iterator[list[int]]:
        length = self._per_rank * self.world_size * self.half
        real = _cycled_permutations(self.n_real, length, np.random.default_rng([self.seed, self.epoch, 0]))
        fake = _cycled_permutations(self.n_fake, length, np.random.default_rng([self.seed, self.epoch, 1]))
        fake += self.n_real
        for batch in range(self.rank, self._per_rank * self.world_size, self.world_size):
            part = slice(batch * self.half, (batch + 1) * self.half)
            yield real[part].tolist() + fake[part].tolist()


class SequentialBatches(Sampler[list[int]]):
    """Evaluation batches in index order, the last one possibly short.

    With world_size > 1 (the torchrun DDP sharding) rank r takes whole batches r, r+W, ... of the
    single-process sequence: the shards are disjoint and together cover every index once, nothing
    padded, so a rank may hold a batch fewer than another (or none); merge their outputs by the item
    index the loader yields. Each batch holds the same images as in one process, so kernels that round
    differently for other batch shapes still give every image the single-process bits.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        starts = range(rank * batch_size, n, world_size * batch_size)
        self.batches = [list(range(start, min(start + batch_size, n))) for start in starts]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(batch) for batch in self.batches)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler so each index travels to the dataset as (epoch, index).

    Why determinism holds across worker counts: persistent DataLoader workers keep the copy
    of the dataset made when they started, so an epoch set on the main process's dataset
    never reaches them. The batch sampler runs in the main process, though, and its output
    is what workers receive: tagging each index with the epoch gives every worker the exact
    (seed, epoch, index) that seeds the item's augmentation, whichever worker gets the batch.
    """

    def __init__(self, batches: Sampler[list[int]]):
        super().__init__()
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch  # fixed for the whole pass even if set_epoch is called mid-way
        for batch in self.batches:
            yield [(epoch, index) for index in batch]


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
                device_type: str = "cpu", *, rank: int = 0, world_size: int = 1, crop_on: str = "host") -> DataLoader:
    """Balanced shuffled batches for training, sequential unshuffled ones (nothing dropped) for eval.

    `rank`/`world_size` shard the batches for a torchrun DDP process (see the samplers; for training
    `batch_size` is then the per-rank batch); a single process keeps the defaults 0 and 1.
    `crop_on` (auto | host | device, `forensics.device_crop.resolve_crop_on`): host batches hold float crops;
    device batches the uncropped uint8 images and their windows, for `device_crop.to_device_batch` to crop
    where the model runs. Both give the same model inputs, bit for bit.
    """
    if train:
        batches = BalancedBatchSampler(dataset.n_real, dataset.n_fake, batch_size, seed,
                                       rank=rank, world_size=world_size)
    else:
        batches = SequentialBatches(len(dataset), batch_size, rank=rank, world_size=world_size)
    device_mode = resolve_crop_on(crop_on, dataset, device_type) == "device"
    return DataLoader(UncroppedItems(dataset) if device_mode else dataset, batch_sampler=EpochBatches(batches),
                      num_workers=workers, collate_fn=collate_uncropped if device_mode else None,
                      pin_memory=device_type == "cuda", persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch whose batch order and augmentation the loader's next pass uses."""
    for part in (loader.batch_sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
