"""What a checkpoint may make patchscope allocate: a byte budget while unpickling, tensors no larger than their
storage, and networks no larger than the weights their file holds, all checked before the memory is taken.

Used by `generators.io.safe_pickle`, `generators.io.archive` and every format loader.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from patchscope.common.errors import CheckpointError

# A tensor may view more elements than its storage holds (stride 0, overlapping strides) only up to this:
# beyond it, the first copy (`contiguous`, `float`, `load_state_dict`) would materialise gigabytes.
MAX_EXPANSION_BYTES = 16 << 20
# Sane limits of every supported architecture (the largest public models: 1024 px, 512 channels).
MAX_RESOLUTION = 8192
MAX_CHANNELS = 16384
# Buffers a network makes itself (filters, noise inputs) are not in the file; this much is allowed for them.
NETWORK_SLACK_VALUES = 4 << 20


class Budget:
    """Bytes an unpickler may allocate beyond what it reads: about what the file holds (each of its
    bytes may be copied twice, as text and as the array built from it), so memory stays linear in the file."""

    def __init__(self, limit: int, source: str = "checkpoint") -> None:
        self.limit = int(limit)
        self.used = 0
        self.source = source

    @classmethod
    def for_file(cls, size: int, source: str = "checkpoint") -> Budget:
        return cls(2 * size + (1 << 20), source)

    def charge(self, nbytes: int, what: str) -> None:
        self.used += max(int(nbytes), 0)
        if self.used > self.limit:
            raise CheckpointError(f"{self.source}: {what} would take {nbytes} bytes, more than a file of this size "
                                  f"can hold (refused before allocating)")


def sized(value: Any) -> int:
    """How many items (or bytes) an allow-listed constructor would copy out of `value`."""
    try:
        return len(value)
    except TypeError:
        return 0


def real_bytes(tensor: torch.Tensor) -> int:
    """Bytes actually held behind a tensor: its storage for a plain strided tensor, nothing for the rest
    (meta, sparse, quantized, nested), whose declared shape says nothing about the file."""
    if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized or tensor.is_nested:
        return 0
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return 0


def check_tensor(tensor: torch.Tensor, where: str) -> None:
    """Refuse a tensor whose materialised size exceeds its storage by more than MAX_EXPANSION_BYTES."""
    declared = tensor.numel() * tensor.element_size()
    held = real_bytes(tensor)
    if declared > held + MAX_EXPANSION_BYTES:
        raise CheckpointError(f"{where}: a tensor of shape {list(tensor.shape)[:8]} declares {declared} bytes "
                              f"but holds {held} (stride-0 or overlapping view); refused")


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    state = getattr(value, "__dict__", None)
    return list(state.values()) if isinstance(state, dict) else ()


def check_tensors(obj: Any, where: str) -> None:
    """`check_tensor` on every tensor reachable from `obj`; each object is visited once (shared or cyclic
    structures cost their size, not their expansion)."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, bytearray, int, float, np.ndarray)):
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            check_tensor(value, where)
        else:
            stack.extend(_children(value))


def check_dimension(value: Any, name: str, high: int, where: str, low: int = 1) -> int:
    """`value` as an int in [low, high]; a CheckpointError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise CheckpointError(f"{where}: {name} is {value!r:.40}; expected an integer from {low} to {high}")
    return int(value)


def check_resolution(resolution: Any, where: str, low: int = 4) -> int:
    """A power-of-two output size within [low, MAX_RESOLUTION]."""
    value = check_dimension(resolution, "the resolution", MAX_RESOLUTION, where, low)
    if value & (value - 1):
        raise CheckpointError(f"{where}: the resolution is {value}; expected a power of two")
    return value


def distinct_bytes(weights: Iterable[Any]) -> int:
    """Bytes of data the given tensors or arrays hold, each buffer counted once however many refer to it
    (a pickle's memo lets one buffer stand for every weight of a network)."""
    buffers: dict[tuple[str, int], int] = {}
    for value in weights:
        if isinstance(value, torch.Tensor) and real_bytes(value):
            key, size = ("tensor", value.untyped_storage().data_ptr()), real_bytes(value)
        elif isinstance(value, np.ndarray):
            key, size = ("array", value.__array_interface__["data"][0]), int(value.nbytes)
        else:
            continue
        buffers[key] = max(buffers.get(key, 0), size)
    return sum(buffers.values())


def check_copies(weights: Iterable[Any], where: str) -> None:
    """Refuse weights that present more values than the bytes behind them: loading copies each one,
    so shared or expanded buffers would multiply in memory."""
    weights = [w for w in weights if isinstance(w, np.ndarray) or (isinstance(w, torch.Tensor) and not w.is_meta)]
    values = sum(int(w.numel()) if isinstance(w, torch.Tensor) else int(w.size) for w in weights)
    held = distinct_bytes(weights)
    if values > held + NETWORK_SLACK_VALUES:
        raise CheckpointError(f"{where}: its weights present {values} values over {held} bytes of data "
                              "(one buffer shared by many weights); refused before copying them")


def build_within(build: Callable[[], nn.Module], weights: Iterable[Any], where: str) -> nn.Module:
    """Build a network only if it is no larger than the weights that will fill it.

    The network is first built on the meta device (no memory), so options or shapes that describe a
    huge network (a depth of 6000, a resolution of 2^20) are refused before anything is allocated.
    """
    with torch.device("meta"):
        probe = build()
    needed = sum(math.prod(t.shape) for t in probe.state_dict().values())
    held = distinct_bytes(weights)  # at least a byte per value, whatever the file's dtype
    if needed > held + NETWORK_SLACK_VALUES:
        raise CheckpointError(f"{where}: the architecture it describes has {needed} values, "
                              f"but the file holds only {held} bytes of weights; refused before allocating")
    return build()
