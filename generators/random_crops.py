"""`patchscope prepare --random-crops N`: many real images from a few photographs, split by photograph.

Each source photo gives N crops by the demo's recipe (`common.crops`: a random square of side
crop_size..max_scale x crop_size, Lanczos to crop_size, mirrored half the time), then the same
resizes as `prepare` (Lanczos to the generator's resolution, then to the working size). Photos, not
crops, are dealt to train/val/test, so no photo lends content to two splits. A photo's crops depend
only on the seed, its name and its size, and the manifest records each crop's photo and box.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchscope.common.crops import DEFAULT_MAX_SCALE, CropBox, cut_crop, draw_crop
from patchscope.common.errors import DatasetError
from patchscope.common.images import BadImageError, image_size, read_image
from patchscope.common.progress import progress_bar
from patchscope.common.userfiles import open_regular
from patchscope.generators.dataset_folder import (MANIFEST, is_complete_png, remove_stale_temps, write_manifest,
                                                 write_png)
from patchscope.generators.prepare import (RealImage, assign_splits, claim_folder, collect_images, preprocess,
                                          warn_skipped)

PIPELINE = ("random square crop of side crop_size..max_scale x crop_size, Pillow Lanczos to crop_size, mirrored "
            "with probability 1/2, Pillow Lanczos to resolution, uint8, Pillow Lanczos to size, PNG")


def photo_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one photo's crops: from the seed and the photo's name, not its place in the
    list, so adding or removing other photos leaves its crops as they were."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng([seed % 2 ** 64, int.from_bytes(digest[:8], "big")])


def plan_crops(image: RealImage, width: int, height: int, n: int, crop_size: int, max_scale: float,
               seed: int) -> dict[str, CropBox]:
    """Output path (relative to the dataset folder) -> crop box, for the n crops of one photo."""
    rng = photo_rng(seed, image.name)
    digits = max(4, len(str(n - 1)))
    stem = f"{image.split}/{image.name}" if image.split else image.name
    return {f"{stem}_{i:0{digits}d}.png": draw_crop(rng, height, width, crop_size, max_scale) for i in range(n)}


def prepare_random_crops(sources: Sequence[str | os.PathLike], out: str | os.PathLike, resolution: int,
                         random_crops: int, crop_size: int | None = None, size: int | None = None,
                         counts: dict[str, int] | None = None, seed: int = 0, max_scale: float = DEFAULT_MAX_SCALE,
                         on_bad_image: str = "skip", progress: bool | Callable[[str, int, int], None] = True,
                         workers: int = 4) -> dict[str, Any]:
    """Write `random_crops` crops of every source photo to `out/[<split>/]<photo>_NNNN.png` with a manifest.

    crop_size: side of a crop before the resizes (None: the resolution); photos smaller than it are
               skipped and named in a log line (refused with on_bad_image="error"), as unreadable ones
    counts:    how many photos (not crops) to deal to each split, or caps of train/val/test folders
    max_scale: crops take a random side between crop_size and max_scale x crop_size (1: exactly crop_size)

    Resumable like `prepare_reals`; the manifest's `files` maps each crop to its source photo, the
    photo's (width, height) and the crop's (left, top, right, bottom) box in the upright photo.
    """
    crop_size = crop_size or resolution
    if min(resolution, size or 1, random_crops, crop_size, workers) < 1 or not max_scale >= 1 \
            or on_bad_image not in ("skip", "error"):
        raise DatasetError(f"need resolution, size, random_crops, crop_size, workers >= 1, max_scale >= 1 and "
                           f"on_bad_image skip|error (got {resolution}, {size}, {random_crops}, {crop_size}, "
                           f"{workers}, {max_scale}, {on_bad_image!r})")
    out = Path(out)
    photos = _distinct_photos(collect_images(sources))
    sizes, unreadable, small = _measure(photos, crop_size, on_bad_image, workers)
    warn_skipped(unreadable, "unreadable photo(s)")
    warn_skipped(small, f"photo(s) smaller than the {crop_size} px crop")
    usable = [photo for photo in photos if (photo.source, photo.name) in sizes]
    if not usable:
        raise DatasetError(f"{', '.join(map(str, sources))}: no photo to crop ({len(unreadable)} unreadable, "
                           f"{len(small)} smaller than the {crop_size} px crop)")
    if counts and not any(photo.split for photo in usable) and sum(counts.values()) > len(usable):
        raise DatasetError(f"asked for {sum(counts.values())} photos ({counts}) but only {len(usable)} can be "
                           f"cropped; with --random-crops, --train/--val/--test count photos, not crops")
    dealt = assign_splits(usable, counts, seed)
    plans = {photo: plan_crops(photo, *sizes[photo.source, photo.name], random_crops, crop_size, max_scale, seed)
             for photo in dealt}
    files = {output: {"source": str(photo.source.resolve()), "photo_size": list(sizes[photo.source, photo.name]),
                      **crop.record()}
             for photo, plan in plans.items() for output, crop in plan.items()}
    settings = {"kind": "reals", "crop": "random", "random_crops": random_crops, "crop_size": crop_size,
                "max_scale": max_scale, "sources": [str(Path(s).resolve()) for s in sources],
                "resolution": resolution, "size": size, "counts": counts, "seed": seed}
    manifest = claim_folder(out, settings, files, PIPELINE)
    for folder in {(out / output).parent for output in files}:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    existing = {output for output in files if is_complete_png(out / output)}
    to_do = {photo: plan for photo, plan in plans.items() if not existing.issuperset(plan)}
    photo_sizes = {photo: sizes[photo.source, photo.name] for photo in to_do}
    written, broken = _write_all(to_do, photo_sizes, out, resolution, size, crop_size, on_bad_image, progress,
                                 workers)
    warn_skipped(broken, "unreadable photo(s)")
    skipped = {**dict(unreadable), **dict(broken)}
    write_manifest(out, {**manifest, "unreadable": skipped, "too_small": dict(small)})
    if broken and not written and not existing:  # an empty dataset is an error, as in `prepare`
        raise DatasetError(f"{', '.join(map(str, sources))}: none of the {len(plans)} photo(s) could be read "
                           f"(first: {broken[0][0]}: {broken[0][1]})")
    splits: dict[str, dict[str, int]] = {}
    for photo, plan in plans.items():
        entry = splits.setdefault(photo.split or ".", {"photos": 0, "count": 0, "existing": 0, "written": 0})
        entry["photos"] += 1
        entry["count"] += len(plan)
        entry["written"] += len(written & set(plan))
        entry["existing"] += len(existing & set(plan))
    return {"out": str(out), "manifest": str(out / MANIFEST), "splits": splits,
            "unreadable": list(skipped), "too_small": [path for path, _ in small]}


Skipped = list[tuple[str, str]]  # (path, reason) pairs


def _distinct_photos(photos: list[RealImage]) -> list[RealImage]:
    """Each photo once: a file named twice (a manifest beside its folder, nested folders) or a byte-identical copy
    would be dealt twice, and its crops could land in two splits. Later duplicates are dropped and named."""
    seen: dict[tuple[int, str], RealImage] = {}
    kept, dropped = [], []
    for photo in photos:
        try:
            handle, info = open_regular(photo.source)  # a FIFO is not waited on
            with handle:
                key = (info.st_size, hashlib.file_digest(handle, "sha256").hexdigest())
        except OSError:  # unreadable or not a regular file: _measure skips or refuses it with its reason
            kept.append(photo)
            continue
        if key in seen:
            dropped.append((photo.source, f"the same file as {seen[key].source}"))
        else:
            seen[key] = photo
            kept.append(photo)
    warn_skipped(dropped, "duplicate photo(s), kept once so no photo lands in two splits")
    return kept


def _measure(photos: list[RealImage], crop_size: int, on_bad_image: str,
             workers: int) -> tuple[dict[tuple[Path, str], tuple[int, int]], Skipped, Skipped]:
    """(width, height) of each photo that can give a crop, read from its header; the unreadable and the
    too small as (path, reason) pairs, or a DatasetError for the first of them under on_bad_image="error"."""
    def measure(photo: RealImage) -> tuple[int, int] | str:
        try:
            return image_size(photo.source)
        except BadImageError as error:
            return error.reason

    sizes, unreadable, small = {}, [], []
    with ThreadPoolExecutor(workers) as pool:
        for photo, found in zip(photos, pool.map(measure, photos)):
            if isinstance(found, str):
                problem, into = found, unreadable
            elif min(found) < crop_size:
                problem, into = f"{found[0]}x{found[1]} px, smaller than the {crop_size} px crop", small
            else:
                sizes[photo.source, photo.name] = found
                continue
            if on_bad_image == "error":
                raise DatasetError(f"{photo.source}: {problem}")
            into.append((str(photo.source), problem))
    return sizes, unreadable, small


def _write_all(plans: dict[RealImage, dict[str, CropBox]], sizes: dict[RealImage, tuple[int, int]], out: Path,
               resolution: int, size: int | None, crop_size: int, on_bad_image: str,
               progress: bool | Callable[[str, int, int], None], workers: int) -> tuple[set[str], Skipped]:
    """Decode each photo once and write its missing crops; returns the outputs written and the photos
    that passed the header check but failed to decode, as (path, reason) pairs."""
    def process(photo: RealImage) -> str | list[str]:
        try:
            pixels = read_image(photo.source)
        except BadImageError as error:
            return error.reason
        if pixels.shape[1::-1] != sizes[photo]:
            return f"now {pixels.shape[1]}x{pixels.shape[0]} px, {sizes[photo][0]}x{sizes[photo][1]} when listed"
        done = []
        for output, crop in plans[photo].items():
            if not is_complete_png(out / output):
                image = Image.fromarray(np.ascontiguousarray(cut_crop(pixels, crop, crop_size)))
                write_png(out / output, preprocess(image, resolution, size, crop="none"))
                done.append(output)
        return done

    bar = progress_bar(total=len(plans), desc="prepare", unit="photo", leave=False,
                       disable=callable(progress) or not progress or not plans)
    written: set[str] = set()
    broken: list[tuple[str, str]] = []
    pool = ThreadPoolExecutor(workers)
    try:
        for done, (photo, result) in enumerate(zip(plans, pool.map(process, plans)), 1):
            if isinstance(result, str) and on_bad_image == "error":
                raise DatasetError(f"{photo.source}: {result}")
            if isinstance(result, str):
                broken.append((str(photo.source), result))
            else:
                written.update(result)
            bar.update()
            if callable(progress):
                progress("reals", done, len(plans))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return written, broken
