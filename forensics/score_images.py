"""Score unlabelled images with a trained classifier: P(fake) per image under every aggregation.

`patchscope score` runs `analysis.score_images.run_score`, which calls `score_images` here. The images
go through exactly what `forensics.evaluate.evaluate` does to a test set (the same decoding, bad-file
check, load size, view (`forensics.evaluate.view_crop_size`: the centre crop or the whole resized image),
normalisation, batching and memory format), so an image scores the same whether it is scored here or as
part of an eval test set.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import check_bool, check_choice, check_int, check_text
from patchscope.common.device import PRECISIONS, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.labels import p_fake
from patchscope.forensics import checkpoint, data
from patchscope.forensics.evaluate import VIEWS, predict, printable_path, scoring_view
from patchscope.forensics.scoring import AGGREGATIONS, image_scores

log = logging.getLogger("patchscope.score")

CSV_NAME, JSON_NAME = "scores.csv", "scores.json"  # what --out DIR holds
SCORE_DIGITS = 6  # decimals in the CSV, as eval's scores_<test set>.csv


@dataclass
class ScoreConfig:
    run: str = ""                                    # classifier run directory or .safetensors file
    inputs: list[str] = field(default_factory=list)  # image files, folders, .txt/.csv manifests
    out: str | None = None                           # folder for scores.csv and scores.json
    csv: str | None = None                           # CSV file (instead of OUT/scores.csv)
    json: str | None = None                          # JSON file (instead of OUT/scores.json)
    heatmaps: str | None = None                      # folder for one heatmap card per image + heatmaps.html
    which: str = "best"                              # best | last checkpoint of a run directory
    split: str | None = None                         # only this split folder/manifest split (None: every image)
    load_size: int | None = None                     # None: as the classifier was trained
    crop_size: int | None = None
    view: str = "auto"                               # auto | full | crop, as eval's (view_crop_size)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    on_bad_image: str = "skip"
    force: bool = False                              # replace existing score files / heatmap page

    def __post_init__(self) -> None:
        for name in ("run", "device"):
            check_text(self, name)
        for name in ("out", "csv", "json", "heatmaps", "split"):
            check_text(self, name, optional=True)
        if isinstance(self.inputs, str):  # `inputs: folder` in YAML: one input
            self.inputs = [self.inputs]
        if not isinstance(self.inputs, (list, tuple)) or not all(isinstance(s, str) and s for s in self.inputs):
            raise InputError(f"setting inputs={self.inputs!r}: expected a list of image files, folders or manifests")
        self.inputs = list(self.inputs)
        check_choice(self, "which", checkpoint.CHECKPOINT_CHOICES)
        check_int(self, "load_size", 1, optional=True)
        check_int(self, "crop_size", 1, optional=True)
        check_choice(self, "view", VIEWS)
        check_int(self, "batch_size", 1)
        check_choice(self, "precision", PRECISIONS)
        check_int(self, "workers", 0)
        check_choice(self, "on_bad_image", data.BAD_IMAGE_POLICIES)
        check_bool(self, "force")


# ----------------------------------------------------------------------------- inputs

def list_inputs(sources: list[str], split: str | None = None) -> list[Path]:
    """The image files named by `sources`, in order, each once: an image file is itself; a .txt/.csv
    manifest lists paths (rows of `split` only, when its CSV has a split column and a split is given);
    a folder gives every image below it, or only its `split` subfolder when it has split folders."""
    if not sources:
        raise InputError("no images given (expected image files, folders or .txt/.csv manifests)")
    found: dict[Path, None] = {}
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            if split is None:
                images = sorted(data.walk_images(path, data.IMAGE_EXTENSIONS))
                if not images:
                    raise InputError(f"{path}: no images found (expected files ending in "
                                     f"{', '.join(sorted(data.IMAGE_EXTENSIONS))})")
            else:
                images = data.list_images(path, split)
        elif data.is_image_file(path):
            if not path.exists():
                raise InputError(f"{path}: no such image file")
            images = [path]
        else:  # a manifest, or a missing / unknown path: list_images says which
            images = data.list_images(path, split)
        found.update(dict.fromkeys(images))
    return list(found)


class UnlabelledImages(data.RealFakeDataset):
    """An eval-mode `RealFakeDataset` whose images all sit in the first class and whose second is empty:
    items are cropped and normalised by the very code that prepares eval's test sets (the label is unused)."""

    class _Empty:
        paths: list[Path] = []
        sizes: list[tuple[int, int]] = []
        cached = True

        def __len__(self) -> int:
            return 0

    def __init__(self, images: data.ImageSet, crop_size: int | None):
        super().__init__(images, self._Empty(), crop_size=crop_size, train=False)


# ----------------------------------------------------------------------------- scoring

@dataclass
class ImageScores:
    """What `score_images` measured: one row per image kept, in input order."""
    paths: list[Path]
    scores: dict[str, np.ndarray]          # aggregation -> N float32 P(fake)
    patch_probs: torch.Tensor              # N x H' x W' patch P(fake), float32, CPU
    skipped: list[tuple[Path, str]]        # (file, reason) of every unreadable file
    meta: dict[str, Any]                   # run, checkpoint, model, epoch, load/crop size, view, device, precision
    dataset: UnlabelledImages              # the items scored (dataset[i][0] is image i's classifier input)
    model: torch.nn.Module

    def summary(self) -> dict[str, Any]:
        """The JSON document: settings, counts, mean score per aggregation, skipped files and every row."""
        return {**self.meta, "aggregations": list(AGGREGATIONS), "n": len(self.paths),
                "n_skipped": len(self.skipped),
                "mean": {mode: float(values.mean()) for mode, values in self.scores.items()},
                "skipped": [{"path": printable_path(p), "reason": reason} for p, reason in self.skipped],
                "images": [{"path": printable_path(p), **{m: float(self.scores[m][i]) for m in AGGREGATIONS}}
                           for i, p in enumerate(self.paths)]}


def score_images(config: ScoreConfig, progress: bool = False) -> ImageScores:
    """Load the classifier, check and decode the images as eval does, and score them in batches."""
    paths = list_inputs(config.inputs, config.split)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    configure_backends(device)
    model, meta = checkpoint.load_classifier(config.run, config.which, device)
    model = model.to(memory_format=torch.channels_last)
    sizes = scoring_view(model, meta, config.view, config.load_size, config.crop_size, warn=log)  # eval's
    images = data.ImageSet(paths, load_size=sizes.load_size, min_size=sizes.min_size,
                           on_bad_image=config.on_bad_image, cache=False, workers=config.workers, progress=progress)
    dataset = UnlabelledImages(images, sizes.input_crop)
    loader = data.make_loader(dataset, config.batch_size, train=False, workers=config.workers,
                              device_type=device.type)
    logits, _ = predict(model, loader, device, precision, keep_logits=True)
    scores = {mode: image_scores(logits, mode).numpy() for mode in AGGREGATIONS}
    info = {"run": str(config.run), "checkpoint": str(checkpoint.resolve_checkpoint(config.run, config.which)),
            "model": meta.get("model"), "checkpoint_epoch": meta.get("epoch"), "load_size": sizes.load_size,
            "crop_size": sizes.crop_size, "view": sizes.view, "input_size": sizes.input_crop, "device": str(device),
            "precision": precision}
    return ImageScores(list(images.paths), scores, p_fake(logits), list(images.skipped), info, dataset, model)


# ----------------------------------------------------------------------------- writing

def output_files(config: ScoreConfig) -> dict[str, Path]:
    """{"csv": path, "json": path} the settings ask for (--csv/--json over --out DIR), refused before any
    work when a path is a folder, or a file that exists without `force`."""
    out = Path(config.out) if config.out else None
    files = {}
    for kind, explicit, name in (("csv", config.csv, CSV_NAME), ("json", config.json, JSON_NAME)):
        path = Path(explicit) if explicit else (out / name if out else None)
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{path}: is a folder; expected a file name for the {kind.upper()} scores")
        if path.exists() and not config.force:
            raise InputError(f"{path} exists; pass --force to replace it or choose another path")
        files[kind] = path
    if len(set(files.values())) < len(files):
        raise InputError(f"--csv and --json name the same file {files['csv']}")
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"{out}: not a folder (--out is a folder for {CSV_NAME} and {JSON_NAME})")
    return files


def scores_csv(result: ImageScores) -> str:
    """path, then P(fake) under each aggregation with eval's 6 decimals; non-UTF-8 names escaped as `\\xNN`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *AGGREGATIONS])
    columns = [result.scores[mode].tolist() for mode in AGGREGATIONS]
    for path, *values in zip(result.paths, *columns):
        writer.writerow([printable_path(path), *(f"{v:.{SCORE_DIGITS}f}" for v in values)])
    return buffer.getvalue()


def write_scores(result: ImageScores, files: dict[str, Path]) -> dict[str, str]:
    """Write the CSV and/or JSON (atomically) that `output_files` chose; returns {kind: path}."""
    written = {}
    for kind, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "csv":
            write_text(path, scores_csv(result))
        else:
            write_json(path, result.summary())
        written[kind] = str(path)
    return written


def format_scores(result: ImageScores, lines: int = 10) -> str:
    """A short table: the first `lines` rows, then the count (and files skipped) and the mean per aggregation."""
    width = max([len("image")] + [len(printable_path(p)) for p in result.paths[:lines]])
    width = min(width, 60)
    text = [f"{'image':<{width}} " + " ".join(f"{mode:>14}" for mode in AGGREGATIONS)]
    for i, path in enumerate(result.paths[:lines]):
        name = printable_path(path)
        name = name if len(name) <= width else "…" + name[-(width - 1):]
        text.append(f"{name:<{width}} " + " ".join(f"{result.scores[m][i]:>14.4f}" for m in AGGREGATIONS))
    rest = len(result.paths) - lines
    if rest > 0:
        text.append(f"... {rest} more")
    text.append(f"{'mean':<{width}} " + " ".join(f"{_mean(result.scores[m]):>14.4f}" for m in AGGREGATIONS))
    skipped = f" ({len(result.skipped)} unreadable skipped)" if result.skipped else ""
    text.append(f"{len(result.paths)} images scored{skipped}")
    return "\n".join(text)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def safe_stem(path: str | os.PathLike) -> str:
    """A file-name-safe part from a source path (heatmap cards); the page shows the real name."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in Path(path).stem)
    return stem[:60] or "image"
