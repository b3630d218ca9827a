"""Most predictive patches: per image the output cell most sure of the true class, its pixel box, crops.

`patchscope patches` runs `run_patches`; the retrain comparison reuses `top_patches` and `random_patches`.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from patchscope.analysis.grids import save_grid, save_image
from patchscope.analysis.segment import LowLevelSegmenter, Segmenter, class_histogram, patch_class, plot_histograms
from patchscope.common import config as configs
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import check_bool, check_choice, check_int, check_text
from patchscope.common.device import PRECISIONS, configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.labels import FAKE, LABEL_NAMES, LABELS, REAL, p_fake
from patchscope.common.progress import progress_bar
from patchscope.forensics import checkpoint, data
from patchscope.forensics.evaluate import VIEWS, predict, scoring_view
from patchscope.forensics.receptive import ModelLike, ReceptiveField, Size, patch_boxes, receptive_field

log = logging.getLogger("patchscope.patches")

PADDING_GRAY = 128  # what zero padding looks like to the classifier: 0 in [-1, 1]


@dataclass(frozen=True)
class PatchRecord:
    """One chosen patch: which image, which output cell, how sure, and the pixels it reads."""

    index: int                      # item index in the dataset (reals first, then fakes)
    path: str                       # image file ("" when unknown)
    label: int                      # 0 real, 1 fake
    row: int                        # output cell
    col: int
    prob: float                     # probability of the image's true class at that cell
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in model-input pixels, bottom/right exclusive
    semantic: int | None = None     # segmenter class covering most of the box

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "box": list(self.box)}


def _as_numpy(patch_probs: Any) -> np.ndarray:
    values = patch_probs.detach().cpu().numpy() if isinstance(patch_probs, torch.Tensor) else np.asarray(patch_probs)
    if values.ndim != 3:
        raise InputError(f"patch probabilities must be N x H' x W' P(fake) maps, got shape {values.shape}")
    return values


def _checked(patch_probs: Any, labels: Any, model: ModelLike, input_size: Size) -> tuple[np.ndarray, ...]:
    probs = _as_numpy(patch_probs)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    if labels.shape != probs.shape[:1] or not np.isin(labels, LABELS).all():
        raise InputError(f"expected one 0/1 label per map ({probs.shape[0]}), got {labels.shape}")
    boxes = patch_boxes(model, input_size)
    if boxes.shape[:2] != probs.shape[1:]:
        raise InputError(f"maps of {probs.shape[1]}x{probs.shape[2]} cells do not fit the model at input size "
                         f"{input_size} ({boxes.shape[0]}x{boxes.shape[1]} cells)")
    return probs, labels, boxes


def _record(index: int, row: int, col: int, probs: np.ndarray, labels: np.ndarray, boxes: np.ndarray,
            paths: Sequence[Any] | None) -> PatchRecord:
    fake_prob = float(probs[index, row, col])
    label = int(labels[index])
    return PatchRecord(index=index, path=str(paths[index]) if paths is not None else "", label=label,
                       row=row, col=col, prob=fake_prob if label == FAKE else 1.0 - fake_prob,
                       box=tuple(int(v) for v in boxes[row, col]))


def best_cells(patch_probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) per image of the cell most sure of its true class: max P(fake) for fakes, min for reals.

    Ties go to the first cell in row-major order. Reals use argmin of P(fake) itself rather than
    argmax of 1 - P(fake), which float rounding could tie.
    """
    probs = _as_numpy(patch_probs)
    flat = probs.reshape(len(probs), -1)
    labels = np.asarray(labels)
    cells = np.where(labels == FAKE, flat.argmax(axis=1), flat.argmin(axis=1))
    return np.unravel_index(cells, probs.shape[1:])


def top_patches(patch_probs: Any, labels: Any, model: ModelLike, input_size: Size, n: int,
                per_class: bool = True, paths: Sequence[Any] | None = None) -> list[PatchRecord]:
    """The n images whose best cell is surest of their true class, one patch each, surest first.

    With `per_class`, n reals then n fakes; otherwise n overall. Equal probabilities rank by index.
    """
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    probs, labels, boxes = _checked(patch_probs, labels, model, input_size)
    rows, cols = best_cells(probs, labels)
    records = [_record(i, int(rows[i]), int(cols[i]), probs, labels, boxes, paths) for i in range(len(probs))]
    ranked = sorted(records, key=lambda r: (-r.prob, r.index))
    if not per_class:
        return ranked[:n]
    return [r for label in (REAL, FAKE) for r in [r for r in ranked if r.label == label][:n]]


def random_patches(patch_probs: Any, labels: Any, model: ModelLike, input_size: Size, seed: int = 0,
                   indices: Sequence[int] | None = None, paths: Sequence[Any] | None = None) -> list[PatchRecord]:
    """One uniformly random cell per image (of `indices`, default all): the baseline for the histograms.

    The cell of image i depends on (seed, i) only, so a subset draws the same cells as the full set.
    """
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    probs, labels, boxes = _checked(patch_probs, labels, model, input_size)
    height, width = probs.shape[1:]
    chosen = range(len(probs)) if indices is None else indices
    records = []
    for index in chosen:
        rng = np.random.default_rng([seed, int(index)])
        records.append(_record(int(index), int(rng.integers(height)), int(rng.integers(width)),
                               probs, labels, boxes, paths))
    return records


# ----------------------------------------------------------------------------- pixels

def crop_patch(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The pixels of `box` (top, left, bottom, right) in an H x W x C image."""
    top, left, bottom, right = box
    return image[top:bottom, left:right]


def patch_tile(image: np.ndarray, record: PatchRecord, rf: ReceptiveField) -> np.ndarray:
    """The whole receptive-field window of a cell: its crop where it lies, gray where the model saw padding."""
    tile = np.full((rf.size, rf.size, image.shape[2]), PADDING_GRAY, np.uint8)
    # Where the clipped box starts inside the unclipped window of the cell.
    top = record.box[0] - (rf.first_edge + record.row * rf.jump)
    left = record.box[1] - (rf.first_edge + record.col * rf.jump)
    crop = crop_patch(image, record.box)
    tile[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    return tile


def write_png(path: str | Path, pixels: np.ndarray) -> None:
    save_image(path, Image.fromarray(np.ascontiguousarray(pixels)))


def contact_sheet(path: str | Path, tiles: Sequence[np.ndarray], captions: Sequence[str], title: str,
                  cols: int | None = None) -> None:
    """Tiles in a near-square grid (blank cells at the end), each with its caption, written as PNG."""
    cols = cols or int(np.ceil(np.sqrt(len(tiles))))
    cells: list[Any] = [*tiles] + [None] * (-len(tiles) % cols)
    texts: list[Any] = [*captions] + [None] * (-len(tiles) % cols)
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    save_grid(path, rows, captions=[texts[i:i + cols] for i in range(0, len(texts), cols)], title=title)


def model_input_pixels(dataset: data.RealFakeDataset, index: int) -> np.ndarray:
    """uint8 H x W x 3 of exactly what the classifier was fed for item `index` (after eval's view)."""
    x = dataset[index][0]
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- the command

@dataclass
class PatchesConfig:
    run: str = ""                   # classifier run directory or .safetensors file
    real: str = ""                  # real images: split folders, a flat folder or a manifest
    fake: str = ""                  # fake images, same layouts
    out: str | None = None          # results folder (default: <run>/patches)
    split: str = "test"             # split folder used when the sources have splits
    n: int = 100                    # images kept, one patch each: per class with per_class, else overall
    per_class: bool = True
    face_parser: str | None = None  # BiSeNet 79999_iter.pth; None: the low-level flat/edge/texture segmenter
    seed: int = 0                   # random baseline patches
    which: str = "best"
    load_size: int | None = None    # None: as the classifier was trained
    crop_size: int | None = None
    view: str = "auto"              # auto | full | crop, as eval's (forensics.evaluate.view_crop_size)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    on_bad_image: str = "skip"
    sheet_max: int = 225            # patches per contact sheet (15 x 15)
    save_crops: bool = True         # one PNG per top patch under crops/
    force: bool = False             # replace an existing patches.json

    def __post_init__(self) -> None:
        for name in ("run", "real", "fake", "split", "device"):
            check_text(self, name)
        for name in ("out", "face_parser"):
            check_text(self, name, optional=True)
        for name in ("n", "batch_size", "sheet_max"):
            check_int(self, name, 1)
        check_int(self, "seed", 0)
        check_choice(self, "which", checkpoint.CHECKPOINT_CHOICES)
        check_int(self, "load_size", 1, optional=True)
        check_int(self, "crop_size", 1, optional=True)
        check_choice(self, "view", VIEWS)
        check_choice(self, "precision", PRECISIONS)
        check_int(self, "workers", 0)
        check_choice(self, "on_bad_image", data.BAD_IMAGE_POLICIES)
        for name in ("per_class", "save_crops", "force"):
            check_bool(self, name)


def make_segmenter(face_parser: str | None, device: torch.device) -> Segmenter:
    if face_parser:
        from patchscope.analysis.bisenet import BiSeNetSegmenter  # torch model code only needed for faces
        return BiSeNetSegmenter(face_parser, device=device)
    return LowLevelSegmenter()


def score_images(cfg: PatchesConfig, device: torch.device) -> dict[str, Any]:
    """Load the classifier and the images as it was trained; P(fake) maps, labels and the geometry."""
    configure_backends(device)
    model, meta = checkpoint.load_classifier(cfg.run, cfg.which, device)
    model = model.to(memory_format=torch.channels_last)
    sizes = scoring_view(model, meta, cfg.view, cfg.load_size, cfg.crop_size, warn=log)
    rf = receptive_field(model)
    # Not cached: each image is decoded when checked at load and when scored; only the n chosen ones once more.
    dataset = data.load_split(cfg.real, cfg.fake, cfg.split, load_size=sizes.load_size, crop_size=sizes.input_crop,
                              min_size=sizes.min_size, on_bad_image=cfg.on_bad_image, cache=False,
                              workers=cfg.workers, train=False)
    loader = data.make_loader(dataset, cfg.batch_size, train=False, workers=cfg.workers, device_type=device.type)
    logits, labels = predict(model, loader, device, resolve_precision(cfg.precision, device), keep_logits=True)
    return {"model": model, "meta": meta, "rf": rf, "dataset": dataset, "labels": labels, "view": sizes.view,
            "probs": p_fake(logits), "input_size": tuple(dataset[0][0].shape[-2:])}


def run_patches(run: str, real: str, fake: str, out: str | None = None, split: str = "test", n: int = 100,
                segmenter: Segmenter | None = None, **settings: Any) -> dict[str, Any]:
    """Score images, keep the top-n most predictive patches and random baselines, label them semantically.

    Writes OUT/patches.json (records with their output cell and pixel box, input size, output grid size,
    receptive field, histograms), crops/<label>/*.png,
    sheet_<label>.png, histogram_<label>.png/.json and config.yaml. `settings` are the other
    `PatchesConfig` fields; `segmenter` overrides the one `face_parser` selects.
    """
    cfg = configs.resolve(PatchesConfig, {"run": run, "real": real, "fake": fake, "out": out, "split": split,
                                          "n": n}, settings, source="run_patches")
    run_dir = Path(cfg.run) if Path(cfg.run).is_dir() else Path(cfg.run).parent
    out_dir = Path(cfg.out) if cfg.out else run_dir / "patches"
    if (out_dir / "patches.json").exists() and not cfg.force:
        raise InputError(f"{out_dir}/patches.json exists; pass --force to replace it or choose another --out")
    device = resolve_device(cfg.device)
    segmenter = segmenter or make_segmenter(cfg.face_parser, device)  # a missing parser fails before scoring
    scored = score_images(cfg, device)
    model, rf, dataset, input_size = scored["model"], scored["rf"], scored["dataset"], scored["input_size"]
    paths = dataset.paths
    top = top_patches(scored["probs"], scored["labels"], model, input_size, cfg.n, cfg.per_class, paths)
    baseline = random_patches(scored["probs"], scored["labels"], model, input_size, cfg.seed,
                              [r.index for r in top], paths)
    shutil.rmtree(out_dir / "crops", ignore_errors=True)  # crops of an earlier (forced-over) run
    top, baseline, tiles = _label_and_crop(dataset, top, baseline, segmenter, rf, out_dir, cfg)

    histograms = {}
    for label in sorted({r.label for r in top}):
        name = LABEL_NAMES[label]
        ours = [r for r in top if r.label == label]
        histograms[name] = plot_histograms(
            class_histogram(ours, segmenter.classes),
            class_histogram([r for r in baseline if r.label == label], segmenter.classes), segmenter.classes,
            out_dir / f"histogram_{name}.png",
            title=f"{name} images: most predictive vs random patch ({segmenter.name} classes)")
        shown = ours[:cfg.sheet_max]
        contact_sheet(out_dir / f"sheet_{name}.png", [tiles[r.index] for r in shown],
                      [f"{r.prob:.3f} {segmenter.classes[r.semantic]}" for r in shown],
                      title=f"{name}: most predictive patches, P({name}) and class")
    ranks = class_ranks(top)
    meta = scored["meta"]
    summary = {"run": str(cfg.run), "model": meta.get("model"), "checkpoint_epoch": meta.get("epoch"),
               "split": cfg.split, "view": scored["view"], "input_size": list(input_size),
               "output_size": list(scored["probs"].shape[1:]),
               "receptive_field": dataclasses.asdict(rf), "segmenter": segmenter.name,
               "classes": list(segmenter.classes), "n": cfg.n, "per_class": cfg.per_class, "seed": cfg.seed,
               "histograms": histograms,
               "top": [{**r.to_json(), **({"crop": crop_name(r, ranks[r.index])} if cfg.save_crops else {})}
                       for r in top],
               "random": [r.to_json() for r in baseline]}
    write_text(out_dir / "config.yaml", configs.to_yaml(cfg))
    write_json(out_dir / "patches.json", summary)
    log.info("%d top patches and %d random patches in %s", len(top), len(baseline), out_dir)
    return {**summary, "out": str(out_dir)}


def class_ranks(top: Sequence[PatchRecord]) -> dict[int, int]:
    """Image index -> rank of its patch among the top patches of its class (0 = surest)."""
    ranks, counters = {}, {REAL: 0, FAKE: 0}
    for record in top:
        ranks[record.index], counters[record.label] = counters[record.label], counters[record.label] + 1
    return ranks


def _label_and_crop(dataset: data.RealFakeDataset, top: list[PatchRecord], baseline: list[PatchRecord],
                    segmenter: Segmenter, rf: ReceptiveField, out_dir: Path, cfg: PatchesConfig,
                    chunk: int = 16) -> tuple[list[PatchRecord], list[PatchRecord], dict[int, np.ndarray]]:
    """Segment the chosen images a chunk at a time (memory stays flat for large n); crop and tile as we go."""
    random_of = {r.index: r for r in baseline}
    ranks = class_ranks(top)
    labelled_top, labelled_random, tiles = {}, {}, {}
    for start in progress_bar(range(0, len(top), chunk), desc="segmenting", unit="chunk", leave=False):
        records = top[start:start + chunk]
        images = np.stack([model_input_pixels(dataset, r.index) for r in records])
        maps = segmenter.segment(images)
        for record, image, label_map in zip(records, images, maps):
            labelled_top[record.index] = dataclasses.replace(record, semantic=patch_class(label_map, record.box))
            other = random_of[record.index]
            labelled_random[record.index] = dataclasses.replace(other, semantic=patch_class(label_map, other.box))
            if cfg.save_crops:
                write_png(out_dir / crop_name(record, ranks[record.index]), crop_patch(image, record.box))
            if ranks[record.index] < cfg.sheet_max:
                tiles[record.index] = patch_tile(image, record, rf)
    return [labelled_top[r.index] for r in top], [labelled_random[r.index] for r in baseline], tiles


def crop_name(record: PatchRecord, rank: int) -> str:
    """Where a top patch's crop goes, relative to the results folder."""
    return f"crops/{LABEL_NAMES[record.label]}/{rank:05d}_{record.index}.png"
