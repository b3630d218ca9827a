"""Real/fake image data: listing folders and manifests, decoding, one-time resize cache, the dataset.

Used by `forensics.train` (and through it eval and analysis) to turn image folders into balanced, reproducible batches.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from patchscope.common.errors import InputError
from patchscope.common.images import BadImageError, IMAGE_SUFFIXES, read_image, walk_images  # noqa: F401 - re-exported
from patchscope.common.labels import FAKE, REAL
from patchscope.common.progress import progress_bar
from patchscope.common import distributed
from patchscope.forensics import store as stores
from patchscope.forensics.augment import Augmentation, degradation_rng, random_resized_crop
from patchscope.forensics.batching import (BalancedBatchSampler, EpochBatches, SequentialBatches,  # noqa: F401 - re-exported
                                make_loader, set_epoch)

log = logging.getLogger("patchscope.data")

IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # compare lower-cased
SPLITS = ("train", "val", "test")
BAD_IMAGE_POLICIES = ("skip", "error")
_LAYOUTS = "a folder of images, a folder with train/val/test subfolders, or a .txt/.csv manifest of image paths"


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------- listing

def list_images(source: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Image files of `source`: a split folder layout, a flat folder, or a .txt/.csv manifest."""
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError(f"{source}: no such file or folder (expected {_LAYOUTS})")
    if source.is_file():
        return _read_manifest(source, split)
    present = [name for name in SPLITS if (source / name).is_dir()]
    folder = source
    if present:
        if split is None:
            raise InputError(f"{source}: holds split folders ({', '.join(present)}); choose a split")
        folder = source / split
        if not folder.is_dir():
            raise InputError(f"{folder}: no '{split}' split folder (found {', '.join(present)})")
    images = sorted(walk_images(folder, IMAGE_EXTENSIONS))  # each real folder once, links followed
    if not images:
        raise InputError(f"{folder}: no images found (expected files ending in "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _read_manifest(manifest: Path, split: str | None) -> list[Path]:
    suffix = manifest.suffix.lower()
    if suffix not in (".txt", ".csv"):
        raise InputError(f"{manifest}: not a folder or a manifest (expected {_LAYOUTS})")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{manifest}: not a UTF-8 text manifest ({exc.reason})") from exc
    if suffix == ".txt":
        entries = [line.strip() for line in text.splitlines()]
        entries = [entry for entry in entries if entry and not entry.startswith("#")]
    else:
        entries = _csv_entries(manifest, text, split)
    if not entries:
        raise InputError(f"{manifest}: lists no image paths (expected one path per line/row)")
    paths = [_resolve_entry(manifest, entry) for entry in entries]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise InputError(f"{manifest}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    return paths


def _resolve_entry(manifest: Path, entry: str) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def _csv_entries(manifest: Path, text: str, split: str | None) -> list[str]:
    rows = [row for row in csv.reader(text.splitlines())
            if any(cell.strip() for cell in row) and not row[0].strip().startswith("#")]
    if not rows:
        return []
    names = [cell.strip().lower() for cell in rows[0]]
    first = rows[0][0].strip()
    # A header names its columns; otherwise the first row is data if it looks like an image path.
    has_header = "path" in names or "split" in names or not (
        is_image_file(first) or _resolve_entry(manifest, first).is_file())
    column = names.index("path") if "path" in names else 0
    split_column = names.index("split") if has_header and "split" in names else None
    rows = rows[1:] if has_header else rows
    cell = lambda row, i: row[i].strip() if i < len(row) else ""  # noqa: E731 - ragged rows
    if split is not None and split_column is not None:
        found = sorted({cell(row, split_column) for row in rows})
        rows = [row for row in rows if cell(row, split_column) == split]
        if not rows:
            raise InputError(f"{manifest}: no rows with split '{split}' (splits present: {', '.join(found)})")
    entries = [cell(row, column) for row in rows]
    if "" in entries:
        raise InputError(f"{manifest}: a row has an empty path (expected a path in column {column + 1})")
    return entries


# ----------------------------------------------------------------------------- decoding
# read_image and BadImageError live in common.images: one decoder (EXIF-upright, regular files only) for every command.

def resized_shape(height: int, width: int, load_size: int | None) -> tuple[int, int]:
    """(height, width) after a shorter-side resize to `load_size` (torchvision `Resize(int)` rounding)."""
    if load_size is None or min(height, width) == load_size:
        return height, width
    if height <= width:
        return load_size, int(load_size * width / height)
    return int(load_size * height / width), load_size


def resize_image(img: np.ndarray, load_size: int | None) -> np.ndarray:
    """Lanczos-resize uint8 H x W x 3 so the shorter side is `load_size`; None keeps the image."""
    if load_size is not None and (not isinstance(load_size, (int, np.integer)) or load_size < 1):
        raise InputError(f"load_size must be a positive number of pixels, got {load_size!r}")
    height, width = img.shape[:2]
    new_height, new_width = resized_shape(height, width, load_size)
    if (new_height, new_width) == (height, width):
        return img
    resized = Image.fromarray(np.ascontiguousarray(img)).resize((new_width, new_height), Image.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


# ----------------------------------------------------------------------------- image sets
# The bad-file policy is decided once, when a set is built, and the same way with and without the cache:
# every file is decoded in full there (in `workers` processes), so a file that cannot be decoded is counted,
# named in one warning and left out (or, under "error", stops the command) before any batch exists. A lazy
# set only drops the pixels after that check. Why not skip lazily, inside the DataLoader workers: a file
# dropped mid-epoch would unbalance its batch, shift every later item index (scores CSV, heatmaps, patches)
# and be found at a different moment in each epoch and each worker count; a header check (Pillow's verify)
# cannot see a truncated JPEG, which fails only when decoded. The price is one extra decode per image per
# run for a lazy set (training decodes each image every epoch anyway; eval decodes twice). With a store
# (`forensics.store`), the check is the one decode that fills it: later sets and every item read its memory maps.

# Outcome of one file in a (possibly worker) process: pixels or None, original (width, height), failure reason.
_Outcome = tuple[np.ndarray | None, tuple[int, int] | None, str | None]


def _decode_entry(path: Path, load_size: int | None, keep: bool = True) -> _Outcome:
    """Decode and resize one file; `keep=False` (a lazy set) checks it the same way and returns no pixels."""
    try:
        pixels = read_image(path)
    except BadImageError as exc:
        return None, None, exc.reason
    original = (pixels.shape[1], pixels.shape[0])
    return (resize_image(pixels, load_size) if keep else None), original, None


@contextlib.contextmanager
def _job_runner(workers: int, count: int) -> Iterator[Callable]:
    """`map`-like runner: in-process for workers=0, else an ordered process pool (first bad file first)."""
    if workers <= 0 or count < 2:
        yield map
        return
    with multiprocessing.get_context().Pool(min(workers, count)) as pool:
        chunk = max(1, min(64, count // (4 * workers)))
        yield lambda job, items: pool.imap(job, items, chunksize=chunk)


class ImageSet:
    """Images of one class, each decoded once at construction (the bad-file check); kept in memory when cached.

    Images keep their own aspect ratio: the cache holds one array per image, whatever its shape, and
    `RealFakeDataset` crops them to one shape. With `store` (a folder, `forensics.store`), images missing from
    it are decoded and resized once into it, and items are read-only views of its memory maps, cached or not.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], load_size: int | None = None, min_size: int = 0,
                 on_bad_image: str = "skip", cache: bool = True, workers: int = 0, progress: bool = False,
                 store: str | os.PathLike | None = None):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise InputError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        candidates = [Path(path) for path in paths]
        if not candidates:
            raise InputError("no image paths given (expected at least one image)")
        self.load_size, self.min_size, self.on_bad_image, self.cached = load_size, min_size, on_bad_image, cache
        self.paths: list[Path] = []  # the images kept, in input order
        self.sizes: list[tuple[int, int]] = []  # (height, width) of each kept image after resizing
        self.skipped: list[tuple[Path, str]] = []  # (path, reason) of each unreadable file
        self._pixels: list[np.ndarray] | None = [] if cache and store is None else None
        self._stored = stores.StoredPixels(stores.settings_folder(store, load_size)) if store is not None else None
        job = functools.partial(_decode_entry, load_size=load_size, keep=cache or store is not None)
        with _job_runner(workers, len(candidates)) as run:
            if store is None:
                self._admit_all(candidates, progress_bar(run(job, candidates), total=len(candidates),
                                                         disable=not progress, desc="decoding" if cache else "checking",
                                                         unit="img"))
            elif distributed.active():  # torchrun: rank 0 fills the store as it reads it, then the others read it
                distributed.run_on_main(self._read_store, store, candidates, run, job, progress)
                if not distributed.is_main():
                    self._read_store(store, candidates, run, job, progress)
            else:
                self._read_store(store, candidates, run, job, progress)
        if not self.paths:
            path, reason = self.skipped[0]
            raise InputError(f"none of the {len(candidates)} images could be read (first: {path}: {reason})")
        if self.skipped:
            log.warning("skipped %d of %d images that could not be read: %s", len(self.skipped), len(candidates),
                        "; ".join(f"{path} ({reason})" for path, reason in self.skipped))

    def _read_store(self, store: str | os.PathLike, candidates: list[Path], run: Callable, job: Callable,
                    progress: bool) -> None:
        """Decoded once into the store (only what it lacks), then read from its memory maps."""
        bar = functools.partial(progress_bar, disable=not progress, desc="storing", unit="img")
        self._admit_all(candidates, stores.fetch(store, candidates, self.load_size, run, job, progress=bar))

    def _admit_all(self, candidates: list[Path], outcomes: Iterable) -> None:
        with contextlib.closing(iter(outcomes)):  # a bad file under "error" discards an unfinished segment
            for outcome, path in zip(outcomes, candidates):  # outcomes first: a store commits at its end
                self._admit(path, *outcome)

    def _admit(self, path: Path, pixels: np.ndarray | stores.Ref | None, original: tuple[int, int] | None,
               reason: str | None) -> None:
        if reason is not None:
            if self.on_bad_image == "error":
                raise BadImageError(path, reason)
            self.skipped.append((path, reason))
            return
        width, height = original
        if min(width, height) < self.min_size:
            raise InputError(f"{path}: {width}x{height} px is smaller than the classifier's "
                             f"receptive field/crop ({self.min_size} px)")
        if self._stored is not None:  # `pixels` is the stored image's ref
            self._stored.append(pixels)
        elif pixels is not None:
            pixels.flags.writeable = False  # items are the cached arrays themselves
            self._pixels.append(pixels)
        self.paths.append(path)
        self.sizes.append(resized_shape(height, width, self.load_size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 H x W x 3 (read-only when cached)."""
        if self._pixels is not None:
            return self._pixels[index]
        if self._stored is not None:
            return self._stored[index]
        path = self.paths[index]
        try:
            pixels = read_image(path)
        except BadImageError as exc:  # it decoded when the set was built: never skipped here, mid-epoch
            raise BadImageError(path, f"{exc.reason}; it could be read when the images were loaded, so it "
                                      "changed since") from None
        return resize_image(pixels, self.load_size)


# ----------------------------------------------------------------------------- dataset

class RealFakeDataset(Dataset):
    """Real images (label REAL = 0, indices 0..n_real-1) then fake ones (label FAKE = 1), cropped, flipped, in [-1, 1].

    Training items also go through `augmentation` (blur, JPEG, random resized crop, flip: `forensics.augment`).
    Augmentation draws from generators seeded by (seed, epoch, index) alone, so an item is
    the same whichever worker builds it and in whatever order. A key may be `index` (uses
    `self.epoch`) or `(epoch, index)`, which is what `make_loader` feeds it (see EpochBatches). `uncropped(key)` is
    the item before its crop, with its window: what `make_loader(..., crop_on="device")` batches (device_crop).
    """

    def __init__(self, real: ImageSet, fake: ImageSet, crop_size: int | None, train: bool, seed: int = 0,
                 augmentation: Augmentation | None = None):
        if seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed}")
        self.real, self.fake, self.crop_size, self.train, self.seed = real, fake, crop_size, train, seed
        self.augmentation = augmentation if augmentation is not None else Augmentation()
        self.n_real, self.n_fake = len(real), len(fake)
        self.labels = np.concatenate([np.full(self.n_real, REAL, np.int64), np.full(self.n_fake, FAKE, np.int64)])
        self.epoch = 0
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Every item must come out in one shape: a crop_size square, else the square of the shorter side."""
        entries = [*zip(self.real.paths, self.real.sizes), *zip(self.fake.paths, self.fake.sizes)]
        first_path, (h0, w0) = entries[0]
        for path, (height, width) in entries:
            if self.crop_size is not None and min(height, width) < self.crop_size:
                raise InputError(f"{path}: {width}x{height} px (after resizing) is smaller than the crop "
                                 f"({self.crop_size} px); raise load_size (--load-size) or lower crop_size "
                                 "(--crop-size)")
            if self.crop_size is None and min(height, width) != min(h0, w0):
                raise InputError(f"{path}: {width}x{height} px (after resizing) but {first_path} is {w0}x{h0} px; "
                                 "without crop_size each image is centre-cropped to the square of its shorter "
                                 "side, and these differ: set load_size (--load-size, resizes every shorter "
                                 "side to it) or crop_size (--crop-size)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def paths(self) -> list[Path]:
        """File of each item, in item order (reals then fakes)."""
        return [*self.real.paths, *self.fake.paths]

    @property
    def cached(self) -> bool:
        """True when items come from memory, so loader worker processes would buy little."""
        return self.real.cached and self.fake.cached

    def path(self, index: int) -> Path:
        return self.real.paths[index] if index < self.n_real else self.fake.paths[index - self.n_real]

    def __len__(self) -> int:
        return self.n_real + self.n_fake

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        pixels, (top, left, size, flip), label, index = self.uncropped(key)
        pixels = pixels[top:top + size, left:left + size]
        pixels = pixels[:, ::-1] if flip else pixels
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)  # always a fresh copy
        # In numpy, one thread: torch's intra-op threads cost ~10x per item on a busy CPU; the same float32 values.
        chw /= np.float32(127.5)
        chw -= np.float32(1.0)
        return torch.from_numpy(chw), label, index

    def uncropped(self, key: int | tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, bool], int, int]:
        """(uint8 H x W x 3 before the crop, window (top, left, size, flip), label, index): the item as
        `forensics.device_crop` batches it, with the draws of `__getitem__`, which crops this window on the host.
        The image is the one loaded, degraded (training), or already crop-sized by a random resized crop."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        pixels = self.real[index] if index < self.n_real else self.fake[index - self.n_real]
        if self.train and self.augmentation.degrades:  # on the image as loaded, before the crop (Wang et al.)
            pixels = self.augmentation.degrade(pixels, degradation_rng(self.seed, int(epoch), index))
        pixels, window = self._window(pixels, np.random.default_rng([self.seed, int(epoch), index]))
        return pixels, window, int(self.labels[index]), index

    def _window(self, pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, bool]]:
        """Train: a random crop_size window (or a random resized crop, made here: its window is then the whole
        image), then a coin-flip mirror. Eval: the centre crop_size window. Without crop_size, both take the centred
        square of the shorter side (whole square images stay whole), so images of any aspect ratio batch together;
        train still flips it (and a random resized crop is resized to that square)."""
        height, width = pixels.shape[:2]
        size = self.crop_size
        if self.train and self.augmentation.random_resized_crop:
            size = size if size is not None else min(height, width)
            pixels, top, left = random_resized_crop(pixels, size, rng), 0, 0
        elif self.train and size is not None:
            top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        else:
            size = size if size is not None else min(height, width)
            # torchvision CenterCrop's rounding, so eval crops match the public pipeline.
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        flip = bool(self.train and self.augmentation.flip and rng.random() < 0.5)
        return pixels, (top, left, size, flip)


def load_split(real_source: str | os.PathLike, fake_source: str | os.PathLike, split: str | None = None,
               load_size: int | None = None, crop_size: int | None = None, min_size: int = 0,
               on_bad_image: str = "skip", cache: bool = True, workers: int = 0, train: bool = False,
               seed: int = 0, progress: bool = False, augmentation: Augmentation | None = None,
               store: str | os.PathLike | None = None) -> RealFakeDataset:
    """list_images + ImageSet for both classes + RealFakeDataset, in one call."""
    sets = [ImageSet(list_images(source, split), load_size=load_size, min_size=min_size,
                     on_bad_image=on_bad_image, cache=cache, workers=workers, progress=progress, store=store)
            for source in (real_source, fake_source)]
    return RealFakeDataset(*sets, crop_size=crop_size, train=train, seed=seed, augmentation=augmentation)
