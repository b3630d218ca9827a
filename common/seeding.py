"""Seeded initialisation that leaves every other random stream as it was."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Within: torch's CPU generator seeded with `seed` (layer initialisations draw from it); after: its state as
    before. CUDA generators are not touched: torch.manual_seed would reseed them too (lazily, even before CUDA
    starts), the same on every rank of a DDP run, and the caller's GPU draws would repeat."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
