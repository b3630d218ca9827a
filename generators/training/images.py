"""Real training images for the small progressive GAN: a folder of PNG/JPEG files decoded once,
centre-cropped square and kept in memory as uint8 at each scale. Used by `generators.training.trainer`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchscope.common.errors import CheckpointError
from patchscope.common.images import BadImageError, read_image, walk_images

log = logging.getLogger("patchscope.gan")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class TrainingInputError(CheckpointError):
    """Bad training input: a missing, empty or unreadable image folder, or settings that cannot train
    (a CheckpointError, so that the CLI reports it as one line like every user error of `generators`)."""


def list_training_images(folder: str | os.PathLike) -> list[Path]:
    """PNG and JPEG files under `folder`, recursively, in sorted order (the order fixes the indices);
    hidden files skipped, linked folders followed, each real folder once (`common.images.walk_images`)."""
    root = Path(folder)
    if not str(folder) or not root.is_dir():
        raise TrainingInputError(f"{root}: no such image folder (expected a folder of PNG or JPEG images)")
    files = sorted(walk_images(root, IMAGE_SUFFIXES))
    if not files:
        raise TrainingInputError(f"{root}: no PNG or JPEG images found in the folder or below it")
    return files


def _square(image: Image.Image, size: int) -> np.ndarray:
    """Centre crop to a square, then Lanczos-resize to `size` x `size`, as uint8 H x W x 3."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


class TrainingImages:
    """The images of a folder at the final resolution, and Lanczos-downsized copies per scale.

    Decoded once; unreadable files are skipped, counted and named in the log. Only the
    copy of the scale in use is kept beside the full-resolution one.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int) -> None:
        self.folder = Path(folder)
        self.resolution = resolution
        files = list_training_images(folder)
        arrays, skipped = [], []
        for path in files:
            try:  # the decoder every command uses: upright by EXIF, 16-bit rescaled, FIFOs refused
                arrays.append(_square(Image.fromarray(read_image(path)), resolution))
            except BadImageError:
                skipped.append(path)
        if skipped:
            names = ", ".join(str(p.relative_to(self.folder)) for p in skipped[:10])
            log.warning("skipped %d unreadable image(s) in %s: %s%s", len(skipped), self.folder, names,
                        " ..." if len(skipped) > 10 else "")
        if not arrays:
            raise TrainingInputError(f"{self.folder}: none of its {len(files)} image file(s) could be read")
        self.skipped = skipped
        self.full = np.stack(arrays)  # N x R x R x 3 uint8
        self._size = -1
        self._scaled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.full)

    def at(self, size: int) -> torch.Tensor:
        """All images at `size` px as uint8 N x 3 x size x size (computed once per size)."""
        if size != self._size:
            if size == self.resolution:
                scaled = self.full
            else:
                scaled = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.LANCZOS))
                                   for a in self.full])
            self._scaled = torch.from_numpy(np.ascontiguousarray(scaled.transpose(0, 3, 1, 2)))
            self._size = size
        assert self._scaled is not None
        return self._scaled


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range generators produce."""
    return batch.to(torch.float32).div_(127.5).sub_(1.0)
