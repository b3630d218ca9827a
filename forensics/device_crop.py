"""Crop, flip and normalise whole batches on the device: the `crop_on=device` batch format.

Host batches (`crop_on=host`, what `RealFakeDataset.__getitem__` gives) hold float32 3 x S x S crops in [-1, 1],
made per item in numpy. Device batches (`UncroppedBatch`) hold each item's uint8 H x W x 3 image as it is before
its crop (after blur/JPEG and a random resized crop, which need PIL on the host), and its window
[top, left, size, flip], drawn by `RealFakeDataset.uncropped` from the very (seed, epoch, index) generator draws
`__getitem__` makes. The uint8 batch, a quarter of the float bytes, goes to the device (pinned, non-blocking on
CUDA) and `crop_batch` gathers every window at once (one index_select, no loop over items), mirrors, and scales
with the host's float32 arithmetic, x / 127.5 - 1: the same bits as the host batch, on any device.

`to_device_batch` takes either format to (x on the device, labels, indices), so the training loop and `predict`
do not need to know which one a loader gives; `make_loader(..., crop_on=...)` picks it (`resolve_crop_on`).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from patchscope.common.errors import InputError

log = logging.getLogger("patchscope.data")

CROP_ON = ("auto", "host", "device")
WINDOW = ("top", "left", "size", "flip")  # the columns of UncroppedBatch.windows


class UncroppedBatch(NamedTuple):
    """A device-mode batch: N x H x W x 3 uint8 images before their crop, N x 4 int64 windows (`WINDOW`),
    N int64 labels and N int64 item indices (CPU tensors, pinned by a CUDA loader)."""
    pixels: torch.Tensor
    windows: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def shape_mismatch(dataset: Any) -> str | None:
    """Why the set's items cannot be stacked before their crop (None when they can): their images differ in shape.

    Training with a random resized crop stacks always: that crop, made on the host, is already crop-sized."""
    if getattr(dataset, "train", False) and getattr(dataset.augmentation, "random_resized_crop", False):
        return None
    shapes = dict.fromkeys((*dataset.real.sizes, *dataset.fake.sizes))
    if len(shapes) <= 1:
        return None
    (h0, w0), (h1, w1) = list(shapes)[:2]
    return (f"its {len(dataset)} images differ in shape before the crop ({len(shapes)} shapes, e.g. {w0}x{h0} and "
            f"{w1}x{h1} px after resizing), so they cannot be batched uncropped")


def resolve_crop_on(crop_on: str, dataset: Any, device_type: str) -> str:
    """"host" or "device" for `crop_on` (auto | host | device) and a dataset fed to a `device_type` model.

    auto: device on CUDA when the set's images share one shape before the crop, else host. device with images of
    several shapes falls back to host with one log line saying why (results are the same either way)."""
    if crop_on not in CROP_ON:
        raise InputError(f"crop_on={crop_on!r}: expected one of {', '.join(CROP_ON)}")
    if crop_on == "host":
        return "host"
    reason = shape_mismatch(dataset)
    if crop_on == "auto":
        return "device" if device_type == "cuda" and reason is None and _fewer_bytes(dataset) else "host"
    if reason is not None:
        log.info("crop_on=device: %s; cropping this set on the host instead (same results)", reason)
        return "host"
    return "device"


def _fewer_bytes(dataset: Any) -> bool:
    """Whether the uint8 images before their crop are no more bytes than the float32 crops (H x W <= 4 S^2): a
    small crop of a large image is cheaper to send cropped. A random resized crop is made crop-sized on the host."""
    if getattr(dataset, "train", False) and getattr(dataset.augmentation, "random_resized_crop", False):
        return True
    sizes = [*dataset.real.sizes, *dataset.fake.sizes]
    if not sizes:
        return True
    height, width = sizes[0]
    crop = dataset.crop_size if dataset.crop_size is not None else min(height, width)
    return height * width <= 4 * crop * crop


class UncroppedItems(Dataset):
    """A view of a `RealFakeDataset` whose items are `uncropped(key)`: (uint8 H x W x 3, window, label, index)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[np.ndarray, tuple[int, int, int, bool], int, int]:
        return self.dataset.uncropped(key)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def collate_uncropped(items: list[tuple[np.ndarray, tuple[int, int, int, bool], int, int]]) -> UncroppedBatch:
    """Stack items of `UncroppedItems` into one `UncroppedBatch` (one copy of each image, into the batch)."""
    shape, size = items[0][0].shape, items[0][1][2]
    for pixels, window, _, _ in items:
        if pixels.shape != shape or window[2] != size:
            raise InputError(f"crop_on=device: a batch mixes images of {shape[1]}x{shape[0]} and "
                             f"{pixels.shape[1]}x{pixels.shape[0]} px (crops {size} and {window[2]} px); "
                             "use crop_on=host for images of several shapes")
    pixels = torch.empty((len(items), *shape), dtype=torch.uint8)
    stacked = pixels.numpy()
    for k, item in enumerate(items):
        stacked[k] = item[0]
    windows = torch.tensor([item[1] for item in items], dtype=torch.int64)
    labels = torch.tensor([item[2] for item in items], dtype=torch.int64)
    return UncroppedBatch(pixels, windows, labels, torch.tensor([item[3] for item in items], dtype=torch.int64))


def crop_batch(pixels: torch.Tensor, windows: torch.Tensor, size: int,
               memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """N x 3 x size x size float32 in [-1, 1] from N x H x W x 3 uint8 `pixels` and N x 4 `windows` (`WINDOW`,
    same device): each item's window, mirrored left-right where its flip is set, as `RealFakeDataset` makes it.

    One gather for the batch: pixel (top + r, left + c) of image n, or (top + r, left + size - 1 - c) when flipped,
    selected as rows of 3 bytes from the batch viewed as N*H*W pixels (on a CPU several times faster than indexing
    three dimensions at once). NHWC permuted to NCHW is already channels_last, so that layout costs no copy;
    contiguous_format copies once, in uint8. The scale divides by a float32 127.5 held on the device (true IEEE
    division, as numpy's), not by a Python number: CUDA turns division by a host scalar into a multiplication by
    its rounded reciprocal."""
    n, height, width, channels = pixels.shape
    device = pixels.device
    # int32 pixel numbers where they fit: half the index memory of int64 (batch 256 of 1024 px crops: 1 GiB)
    steps = torch.arange(size, device=device, dtype=torch.int32 if n * height * width < 2**31 else torch.int64)
    windows = windows.to(steps.dtype)
    rows = windows[:, 0, None] + steps  # N x S
    cols = windows[:, 1, None] + torch.where(windows[:, 3, None].bool(), size - 1 - steps, steps)  # N x S
    rows += torch.arange(n, device=device, dtype=steps.dtype)[:, None] * height  # row of the N*H rows of the batch
    flat = (rows[:, :, None] * width + cols[:, None, :]).view(-1)  # N*S*S pixel numbers
    x = pixels.reshape(n * height * width, channels).index_select(0, flat)
    x = x.view(n, size, size, channels).permute(0, 3, 1, 2)  # N x 3 x S x S, channels_last
    if memory_format != torch.channels_last:
        x = x.contiguous(memory_format=memory_format)
    x = x.to(torch.float32)  # keeps the strides
    x.div_(torch.full((), 127.5, dtype=torch.float32, device=device))
    return x.sub_(torch.ones((), dtype=torch.float32, device=device))


def _check_windows(windows: torch.Tensor, shape: torch.Size, size: int) -> None:
    """Every window inside its image (on the host, before the copy): the gather would read a neighbour's pixels."""
    top, left = windows[:, 0], windows[:, 1]
    if bool((top < 0).any() | (left < 0).any() | (top + size > shape[0]).any() | (left + size > shape[1]).any()):
        raise ValueError(f"crop windows {windows.tolist()} of {size} px leave {shape[1]}x{shape[0]} px images")


def to_device_batch(batch: Any, device: torch.device,
                    memory_format: torch.memory_format = torch.channels_last) -> tuple[torch.Tensor, Any, Any]:
    """(x on `device` in `memory_format`, labels, indices) of a batch of either format; labels and indices stay
    where the loader put them (CPU). A host batch is any (x, labels, indices) sequence."""
    if isinstance(batch, UncroppedBatch):
        size = int(batch.windows[0, 2])
        _check_windows(batch.windows, batch.pixels.shape[1:3], size)
        pixels = batch.pixels.to(device, non_blocking=True)
        windows = batch.windows.to(device, non_blocking=True)
        return crop_batch(pixels, windows, size, memory_format), batch.labels, batch.indices
    x, labels, indices = batch
    return x.to(device, non_blocking=True, memory_format=memory_format), labels, indices
