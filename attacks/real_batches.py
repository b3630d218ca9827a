"""Real images for continued GAN training: a folder read once, centre-cropped square at the generator's
resolution (its training pre-processing), served as [-1, 1] batches. Used by attacks.finetune.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from patchscope.common.errors import InputError
from patchscope.forensics.data import ImageSet, list_images

log = logging.getLogger("patchscope.finetune")

CACHE_BYTES = 4 << 30  # decoded images are kept in memory when they fit in this (as `train --cache`)


def centre_square(pixels: np.ndarray, side: int) -> np.ndarray:
    """The centred `side` x `side` window of a uint8 H x W x 3 image whose shorter side is `side`."""
    height, width = pixels.shape[:2]
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top:top + side, left:left + side]


class RealImages:
    """Real images at `resolution` px: shorter side Lanczos-resized to it, then the centred square,
    as the generator's own training data was prepared (and `patchscope prepare` writes them).

    `images` is an ImageSet read with `load_size=resolution`, or uint8 N x 3 x R x R already prepared.
    With `cache` the images are decoded once and held as uint8; otherwise each batch decodes its own.
    """

    def __init__(self, images: ImageSet | torch.Tensor | np.ndarray, resolution: int,
                 cache: bool | None = None) -> None:
        self.resolution = resolution
        self._set: ImageSet | None = None
        self._pixels: torch.Tensor | None = None
        if isinstance(images, ImageSet):
            if images.load_size != resolution:
                raise ValueError(f"the ImageSet was read at load_size {images.load_size}, the generator makes "
                                 f"{resolution} px images")
            self._set = images
            if cache is None:
                cache = len(images) * 3 * resolution ** 2 <= CACHE_BYTES
            if cache:
                self._pixels = self._stack(range(len(images)))
        else:
            pixels = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
            if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, resolution,
                                                                                             resolution):
                raise ValueError(f"expected uint8 N x 3 x {resolution} x {resolution} real images, got "
                                 f"{pixels.dtype} {list(pixels.shape)}")
            self._pixels = pixels.contiguous()
        if len(self) == 0:
            raise InputError("no real images (expected at least one)")

    @classmethod
    def from_source(cls, source: str | os.PathLike, resolution: int, split: str | None = None,
                    on_bad_image: str = "skip", cache: bool | None = None, workers: int = 0) -> RealImages:
        """Images of a folder, split folder or manifest (`forensics.data.list_images`); unreadable
        files are skipped and named in the log, or with on_bad_image="error" refused."""
        paths = list_images(source, split)
        # Checked without decoding here; decoded (once, when cached) below.
        images = ImageSet(paths, load_size=resolution, on_bad_image=on_bad_image, cache=False, workers=workers)
        log.info("%d real images from %s at %d px", len(images), source, resolution)
        return cls(images, resolution, cache)

    def __len__(self) -> int:
        return len(self._pixels) if self._pixels is not None else len(self._set)

    @property
    def cached(self) -> bool:
        return self._pixels is not None

    def _stack(self, indices: Sequence[int]) -> torch.Tensor:
        crops = [centre_square(self._set[int(i)], self.resolution) for i in indices]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()

    def batch(self, indices: torch.Tensor | Sequence[int], flip: torch.Tensor | None = None,
              device: str | torch.device = "cpu") -> torch.Tensor:
        """float32 [-1, 1] images N x 3 x R x R of `indices`; rows where `flip` is True are mirrored."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        pixels = self._pixels[indices] if self._pixels is not None else self._stack(indices.tolist())
        images = pixels.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if flip is not None:
            images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
        return images
