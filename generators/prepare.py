"""Real images through a generator's training pre-processing, written like its samples (REFERENCE §7).

Used by `patchscope prepare` and the demo: centre crop, Lanczos to the generator's resolution,
uint8 (what a lossless PNG at that size holds), then Lanczos to the working size, as the fakes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patchscope.common.errors import DatasetError
from patchscope.common.images import BadImageError, read_image, walk_images
from patchscope.common.runfolder import remove_leftovers
from patchscope.generators.dataset_folder import (MANIFEST, check_same_settings, is_complete_png, read_manifest,
                                                 remove_stale_temps, resize_lanczos, write_manifest, write_png)
from patchscope.generators.custom import open_generator
from patchscope.generators.sampling import SPLIT_SEED_OFFSETS

LOG = logging.getLogger("patchscope.prepare")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
CROPS = ("center", "none")
LISTED_IN_LOG = 20  # unreadable files named in the log line; the manifest lists them all


@dataclass(frozen=True)
class RealImage:
    """One input image and where it goes: `out/<split>/<name>.png` (no split: `out/<name>.png`)."""

    source: Path
    split: str | None
    name: str

    @property
    def output(self) -> str:
        return f"{self.split}/{self.name}.png" if self.split else f"{self.name}.png"


def generator_resolution(path: str | os.PathLike) -> int:
    """The output resolution of the generator in a checkpoint or MODULE:CALLABLE (what its training images were)."""
    return int(open_generator(path).resolution)


# ----------------------------------------------------------------------------- reading

def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode fully into an 8-bit RGB image, upright by its EXIF orientation (`common.images.read_image`,
    the decoder every command uses); raises BadImageError with the reason."""
    return Image.fromarray(read_image(path))


def preprocess(image: Image.Image, resolution: int, size: int | None = None, crop: str = "center") -> Image.Image:
    """Centre-crop to a square (crop="center") or squash (crop="none"), Lanczos to `resolution`,
    then Lanczos to `size` — the same two resizes a sampled fake goes through."""
    if crop not in CROPS:
        raise DatasetError(f"crop must be one of {CROPS}, not {crop!r}")
    if crop == "center":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return resize_lanczos(resize_lanczos(image, resolution), size)


# ----------------------------------------------------------------------------- listing

def collect_images(sources: Sequence[str | os.PathLike]) -> list[RealImage]:
    """Every image in `sources` (image files, `.txt` lists of paths, folders walked recursively);
    a folder with train/val/test subfolders keeps those splits. Hidden files are skipped."""
    found: list[RealImage] = []
    for source in map(Path, sources):
        if not source.exists():
            raise DatasetError(f"{source}: no such image, folder or .txt list")
        if source.is_file() and source.suffix.lower() == ".txt":
            lines = [line.strip() for line in source.read_text().splitlines()]
            found += [RealImage(source.parent / line, None, Path(line).stem) for line in lines if line]
        elif source.is_file():
            found.append(RealImage(source, None, source.stem))
        elif splits := [s for s in SPLIT_SEED_OFFSETS if (source / s).is_dir()]:
            found += [image for split in splits for image in _walk(source / split, split)]
        else:
            found += _walk(source, None)
    if not found:
        raise DatasetError(f"no images found in {', '.join(map(str, sources))} "
                           f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return _unique_names(found)


def _walk(folder: Path, split: str | None) -> list[RealImage]:
    # Walk order (a folder's files, then its subfolders), each real folder once: a link loop
    # would otherwise write the same images again under ever longer names.
    return [RealImage(path, split, path.relative_to(folder).with_suffix("").as_posix())
            for path in walk_images(folder, IMAGE_SUFFIXES)]


def _unique_names(images: list[RealImage]) -> list[RealImage]:
    """Two inputs with one output name (a.jpg and a.png, or two sources) get -2, -3... in input order."""
    seen: dict[str, int] = {}
    unique = []
    for image in images:
        key = image.output
        seen[key] = seen.get(key, 0) + 1
        unique.append(image if seen[key] == 1 else RealImage(image.source, image.split, f"{image.name}-{seen[key]}"))
    return unique


def assign_splits(images: list[RealImage], counts: dict[str, int] | None, seed: int = 0) -> list[RealImage]:
    """Without counts: folder splits kept, flat inputs stay flat. With counts: split folders are
    capped at counts[split] (in name order); flat inputs are shuffled by `seed` and dealt to the
    splits in the order given."""
    labelled = [image for image in images if image.split]
    if labelled and len(labelled) != len(images):
        raise DatasetError("some sources have train/val/test folders and some do not; prepare them separately")
    if counts is None:
        return images
    unknown = sorted(set(counts) - set(SPLIT_SEED_OFFSETS))
    if unknown:
        raise DatasetError(f"unknown split(s) {unknown}; splits are {sorted(SPLIT_SEED_OFFSETS)}")
    if labelled:
        return [image for split, n in counts.items() for image in [i for i in images if i.split == split][:n]]
    if sum(counts.values()) > len(images):
        raise DatasetError(f"asked for {sum(counts.values())} images ({counts}) but the sources hold {len(images)}")
    order = np.random.RandomState(seed).permutation(len(images))
    dealt, position = [], 0
    for split, n in counts.items():
        dealt += [RealImage(images[k].source, split, images[k].name) for k in order[position:position + n]]
        position += n
    return dealt


# ----------------------------------------------------------------------------- preparing

def prepare_reals(sources: Sequence[str | os.PathLike], out: str | os.PathLike, resolution: int,
                  size: int | None = None, crop: str = "center", counts: dict[str, int] | None = None,
                  seed: int = 0, on_bad_image: str = "skip",
                  progress: bool | Callable[[str, int, int], None] = True, workers: int = 4) -> dict[str, Any]:
    """Write every source image through `preprocess` to `out/[<split>/]<name>.png` with a manifest.

    resolution:   the generator's output size (`generator_resolution(checkpoint)`)
    size:         working size both reals and fakes are Lanczos-resized to (None: resolution)
    counts:       split caps, or how many flat images to deal to each split (see `assign_splits`)
    on_bad_image: skip (count and name them in the log, logger `patchscope.prepare`) or error

    Resumable: whole outputs are kept, missing ones made; other settings, or sources that now map
    to other files, are refused with a DatasetError.
    """
    if resolution < 1 or (size or 1) < 1 or workers < 1 or on_bad_image not in ("skip", "error") or crop not in CROPS:
        raise DatasetError(f"need resolution, size, workers >= 1, crop in {CROPS}, on_bad_image skip|error "
                           f"(got {resolution}, {size}, {workers}, {crop!r}, {on_bad_image!r})")
    out = Path(out)
    images = assign_splits(collect_images(sources), counts, seed)
    files = {image.output: str(image.source.resolve()) for image in images}
    settings = {"kind": "reals", "sources": [str(Path(s).resolve()) for s in sources], "resolution": resolution,
                "size": size, "crop": crop, "counts": counts, "seed": seed}
    manifest = claim_folder(out, settings, files)
    to_do = [image for image in images if not is_complete_png(out / image.output)]
    for folder in {(out / image.output).parent for image in images}:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    written, unreadable, upsampled = _write_all(to_do, out, resolution, size, crop, on_bad_image, progress, workers)
    warn_skipped(unreadable, "unreadable image(s)")
    if upsampled:
        LOG.warning("%d image(s) were smaller than %d px and were upsampled; fakes never are", upsampled, resolution)
    write_manifest(out, {**manifest, "unreadable": dict(unreadable)})
    existing = {image.output for image in images} - {image.output for image in to_do}
    if unreadable and not written and not existing:  # an empty dataset is an error, as in `train`
        path, reason = unreadable[0]
        raise DatasetError(f"{', '.join(map(str, sources))}: none of the {len(unreadable)} image file(s) could be "
                           f"read ({len(unreadable)} unreadable; first: {path}: {reason})")
    splits: dict[str, dict[str, int]] = {}
    for image in images:
        entry = splits.setdefault(image.split or ".", {"count": 0, "existing": 0, "written": 0})
        entry["count"] += 1
        entry["existing"] += image.output in existing
        entry["written"] += image.output in written
    return {"out": str(out), "manifest": str(out / MANIFEST), "splits": splits,
            "unreadable": [path for path, _ in unreadable], "upsampled": upsampled}


def warn_skipped(skipped: Sequence[tuple[str, str]], what: str) -> None:
    """One log line naming the first LISTED_IN_LOG skipped (path, reason) pairs; the manifest lists them all."""
    if skipped:
        named = "; ".join(f"{path} ({reason})" for path, reason in skipped[:LISTED_IN_LOG])
        more = f"; and {len(skipped) - LISTED_IN_LOG} more" if len(skipped) > LISTED_IN_LOG else ""
        LOG.warning("skipped %d %s: %s%s", len(skipped), what, named, more)


PIPELINE = "crop, Pillow Lanczos to resolution, uint8, Pillow Lanczos to size, PNG"


def claim_folder(out: Path, settings: dict[str, Any], files: dict[str, Any],
                 pipeline: str = PIPELINE) -> dict[str, Any]:
    """Check `out` may take these outputs (same settings; an output of another source is refused),
    write the manifest with `files` merged in, and return it."""
    recorded = read_manifest(out, settings["kind"])
    old_files = recorded.get("files", {})
    if any(is_complete_png(out / name) for name in old_files):
        check_same_settings(out, recorded, settings)
        moved = [name for name, source in files.items() if old_files.get(name, source) != source]
        if moved:
            raise DatasetError(f"{out}: {moved[0]} was made from {old_files[moved[0]]}, now it would come from "
                               f"{files[moved[0]]} (the sources changed); use a new --out folder")
    manifest = {**settings, "pipeline": pipeline, "files": {**old_files, **files}}
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    write_manifest(out, manifest)
    return manifest


def _write_all(images: list[RealImage], out: Path, resolution: int, size: int | None, crop: str,
               on_bad_image: str, progress: bool | Callable[[str, int, int], None],
               workers: int) -> tuple[set[str], list[tuple[str, str]], int]:
    """Process in a thread pool (Pillow releases the GIL while decoding, resizing and encoding);
    returns the outputs written, the unreadable (path, reason) pairs and how many were upsampled."""
    def process(image: RealImage) -> tuple[str | None, bool]:
        try:
            picture = read_rgb(image.source)
        except BadImageError as error:  # whatever the file is: regular files only, so a FIFO cannot block
            return error.reason, False
        write_png(out / image.output, preprocess(picture, resolution, size, crop))
        return None, min(picture.size) < resolution

    from patchscope.common.progress import progress_bar

    bar = progress_bar(total=len(images), desc="prepare", unit="img", leave=False,
                       disable=callable(progress) or not progress or not images)
    written: set[str] = set()
    unreadable: list[tuple[str, str]] = []
    upsampled = 0
    pool = ThreadPoolExecutor(workers)
    try:
        for done, (image, (problem, small)) in enumerate(zip(images, pool.map(process, images)), 1):
            if problem and on_bad_image == "error":
                raise DatasetError(f"{image.source}: {problem}")
            if problem:
                unreadable.append((str(image.source), problem))
            else:
                written.add(image.output)
            upsampled += small
            bar.update()
            if callable(progress):
                progress("reals", done, len(images))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error or ^C, start nothing new
        bar.close()
    return written, unreadable, upsampled
