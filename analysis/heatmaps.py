"""Classifier heatmaps: patch P(fake) maps placed at their receptive-field centres, overlaid on the images.

Used by `patchscope eval --heatmaps N` (through `write_eval_heatmaps`) and the report: per-image cards,
average maps of the easiest and hardest images of each class, and a lightbox page linking them.

Placement: output cell k along an axis judges the patch centred at pixel `start + k * jump`
(`forensics.receptive`), which is not where stretching the H' x W' grid over the image puts it
(padding and unpadded layers shift the grid). Each cell's value is placed at its receptive-field
centre and interpolated linearly between neighbouring centres; pixels beyond the first/last centre
keep the edge cell's value. `mode="nearest"` instead paints each pixel with the cell whose centre is
nearest (boxes of `jump` px centred on the centres, as `receptive.cell_for_pixel` assigns them).
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from patchscope.analysis.grids import ColourBar, colour_lut, image_grid, save_image, to_uint8
from patchscope.analysis.lightbox import LightboxItem, write_lightbox
from patchscope.common.atomic import write_bytes, write_json
from patchscope.common.device import resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.common.labels import LABEL_NAMES, LABELS, REAL
from patchscope.forensics import checkpoint, data
from patchscope.forensics.evaluate import EvalConfig, parse_test_spec, predict, printable_path, scoring_view
from patchscope.forensics.figures import figure_format, render_figure
from patchscope.forensics.receptive import ModelLike, Size, output_size, receptive_field

GROUPS = ("real_easy", "real_hard", "fake_easy", "fake_hard")
GROUP_TITLES = {"real_easy": "real, easiest", "real_hard": "real, hardest",
                "fake_easy": "fake, easiest", "fake_hard": "fake, hardest"}
MODES = ("linear", "nearest")
DEFAULT_CMAP = "jet"
OVERLAY_ALPHA = 0.5  # share of the heatmap colour in the overlay
CARD_TILE = 384      # px; larger inputs are shown shrunk on the cards (the maps stay at full size)


def _height_width(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def cell_centres(model: ModelLike, input_size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y of each map row, x of each map column) of the receptive-field centres."""
    height, width = _height_width(input_size)
    rf = receptive_field(model)
    rows, cols = output_size(model, height), output_size(model, width)
    return (rf.start + rf.jump * np.arange(rows, dtype=np.float64),
            rf.start + rf.jump * np.arange(cols, dtype=np.float64))


def _interpolation_matrix(centres: np.ndarray, side: int, mode: str) -> np.ndarray:
    """side x cells weights: row i spreads pixel i over the cells whose centres surround it."""
    cells = len(centres)
    jump = centres[1] - centres[0] if cells > 1 else 1.0
    position = np.clip((np.arange(side) - centres[0]) / jump, 0, cells - 1)  # in cell units
    weights = np.zeros((side, cells))
    if mode == "nearest":
        # floor(u + 0.5): a pixel halfway between two centres goes to the later cell, as cell_for_pixel does.
        weights[np.arange(side), np.minimum(np.floor(position + 0.5), cells - 1).astype(int)] = 1.0
        return weights
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, cells - 1)
    frac = position - below
    np.add.at(weights, (np.arange(side), below), 1.0 - frac)
    np.add.at(weights, (np.arange(side), above), frac)
    return weights


def upsample_map(patch_map: Any, model: ModelLike, input_size: Size, mode: str = "linear") -> np.ndarray:
    """H' x W' (or N x H' x W') cell values -> H x W (N x H x W) float32 pixel values; see the module doc."""
    if mode not in MODES:
        raise ValueError(f"unknown heatmap mode {mode!r}; expected one of {', '.join(MODES)}")
    values = _as_float(patch_map)
    if values.ndim not in (2, 3):
        raise ValueError(f"expected a patch map H' x W' or N x H' x W', got shape {values.shape}")
    height, width = _height_width(input_size)
    ys, xs = cell_centres(model, (height, width))
    if values.shape[-2:] != (len(ys), len(xs)):
        raise ValueError(f"patch map is {values.shape[-2]}x{values.shape[-1]} but {_model_name(model)} gives "
                         f"{len(ys)}x{len(xs)} cells for {height}x{width} px inputs")
    rows, cols = _interpolation_matrix(ys, height, mode), _interpolation_matrix(xs, width, mode)
    return np.einsum("hi,...ij,wj->...hw", rows, values, cols).astype(np.float32)


def _as_float(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _model_name(model: ModelLike) -> str:
    return model if isinstance(model, str) else getattr(model, "name", "the model")


def colourize(heat: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Values in [0, 1] (clipped; the range is fixed so maps compare) -> uint8 ... x 3 colours."""
    index = np.rint(np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0) * 255).astype(np.intp)
    return colour_lut(cmap)[index]


def overlay(image: np.ndarray, heat: np.ndarray, cmap: str = DEFAULT_CMAP,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 H x W x 3 image blended with the colourised H x W heatmap."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} px but the heatmap is "
                         f"{heat.shape[1]}x{heat.shape[0]}")
    blend = (1.0 - alpha) * image.astype(np.float64) + alpha * colourize(heat, cmap).astype(np.float64)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def select_extremes(scores: Any, labels: Any, n: int) -> dict[str, list[int]]:
    """Indices of the n easiest (most confidently correct) and n hardest (most wrong) images per class.

    Keys are GROUPS. Scores are P(fake): easy reals have the lowest scores, easy fakes the highest.
    Equal scores keep index order in every group. A class with fewer than n images gives all of them.
    """
    scores_np, labels_np = _as_float(scores).reshape(-1), np.asarray(labels).reshape(-1)
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"{scores_np.size} scores but {labels_np.size} labels")
    if n < 0:
        raise ValueError(f"n must be 0 or more, got {n}")
    if np.isnan(scores_np).any():
        raise ValueError("scores contain NaN")
    if labels_np.size and not np.isin(labels_np, LABELS).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    chosen = {}
    for label, name in enumerate(LABEL_NAMES):
        index = np.flatnonzero(labels_np == label)
        wrongness = scores_np[index] if label == REAL else -scores_np[index]
        # lexsort: the last key is the primary one, index order breaks ties.
        chosen[f"{name}_easy"] = index[np.lexsort((index, wrongness))][:n].tolist()
        chosen[f"{name}_hard"] = index[np.lexsort((index, -wrongness))][:n].tolist()
    return {group: chosen[group] for group in GROUPS}


def average_heatmaps(patch_probs: Any, groups: dict[str, list[int]], model: ModelLike, input_size: Size,
                     mode: str = "linear") -> dict[str, np.ndarray | None]:
    """Mean pixel heatmap (H x W) of each group; None for an empty group.

    Upsampling is linear, so the mean of the maps is upsampled instead of every map.
    """
    probs = _as_float(patch_probs)
    return {group: upsample_map(probs[indices].mean(axis=0), model, input_size, mode) if indices else None
            for group, indices in groups.items()}


def render_card(image: np.ndarray, heat: np.ndarray, title: str, label: str, score: float, max_patch: float,
                cmap: str = DEFAULT_CMAP) -> Image.Image:
    """One image's card: input | heatmap | overlay, the file name as title, label and scores below."""
    return image_grid([[image, colourize(heat, cmap), overlay(image, heat, cmap)]],
                      col_labels=["input", "P(fake) map", "overlay"],
                      captions=[[f"label: {label}", f"score {score:.3f}", f"max patch {max_patch:.3f}"]],
                      title=title, colour_bar=ColourBar(cmap=cmap),
                      tile_size=CARD_TILE if max(image.shape[:2]) > CARD_TILE else None)


def plot_average_heatmaps(averages: dict[str, np.ndarray | None], counts: dict[str, int],
                          path: str | os.PathLike, title: str, cmap: str = DEFAULT_CMAP) -> Path:
    """One figure, a panel per group (two per row: real easiest | hardest, then fake) with a shared [0, 1] colour
    bar, large enough to read each map; written atomically as PNG/PDF/SVG."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    fmt = figure_format(path)
    cols = min(2, len(averages))
    rows = -(-len(averages) // cols)
    figure = Figure(figsize=(4.2 * cols + 1.3, 4.3 * rows + 0.5), layout="constrained")
    axes = list(figure.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[len(averages):]:
        ax.set_axis_off()
    axes = axes[:len(averages)]
    norm = Normalize(0.0, 1.0)
    for ax, (group, heat) in zip(axes, averages.items()):
        if heat is None:
            ax.set_title(f"{GROUP_TITLES.get(group, group)}\n(no images)")
            ax.set_axis_off()
            continue
        ax.imshow(heat, cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"{GROUP_TITLES.get(group, group)}\nn={counts[group]}, mean P(fake) {heat.mean():.3f}")
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
    figure.colorbar(ScalarMappable(norm=norm, cmap=colormaps[cmap]), ax=axes, label="P(fake)", shrink=0.85)
    figure.suptitle(title)
    write_bytes(path, render_figure(figure, fmt, dpi=110, tight=False))
    return path


def collect_inputs(dataset: Any, indices: Sequence[int]) -> np.ndarray:
    """The exact classifier inputs (centre crops) of dataset items as uint8 N x H x W x 3."""
    if getattr(dataset, "train", False):
        raise ValueError("collect_inputs needs a dataset in eval mode (train=False): training items are random crops")
    images = [to_uint8(dataset[int(i)][0]) for i in indices]
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def _file_stem(path: str | os.PathLike) -> str:
    """A safe output file name part from a source path (the page shows the real name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"


def write_heatmaps(images: Any, patch_probs: Any, labels: Any, scores: Any, paths: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, n: int, model_name: ModelLike, input_size: Size | None = None,
                   cmap: str = DEFAULT_CMAP, mode: str = "linear") -> dict[str, Any]:
    """Cards of the n easiest/hardest images per class, their average heatmaps, and `heatmaps.html`.

    `images` are the exact classifier inputs (uint8 N x H x W x 3), `patch_probs` their N x H' x W'
    P(fake) maps, `scores` the image scores used to rank them; `mode` as in `upsample_map`. Writes
    `<group>/<rank>_<name>.png`, `average_heatmaps.png`, `heatmaps.html` and `heatmaps.json` (what was
    written) under `out_dir`. A class with fewer than n images shows all of them in both groups.
    """
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    probs, scores_np = _as_float(patch_probs), _as_float(scores).reshape(-1)
    labels_np = np.asarray(labels).reshape(-1)
    count = len(paths)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected images as uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    if probs.ndim != 3:
        raise ValueError(f"expected patch_probs as N x H' x W' P(fake) maps (forensics.scoring.patch_probabilities "
                         f"of the logits), got shape {probs.shape}")
    if {len(images), len(probs), labels_np.size, scores_np.size} != {count}:
        raise ValueError(f"expected one image, patch map, label and score per path ({count}), got "
                         f"{len(images)}, {len(probs)}, {labels_np.size}, {scores_np.size}")
    height, width = images.shape[1:3]
    if input_size is not None and _height_width(input_size) != (height, width):
        raise ValueError(f"input_size {input_size} differs from the images ({height}x{width} px)")
    out_dir = Path(out_dir)
    groups = select_extremes(scores_np, labels_np, n)
    averages = average_heatmaps(probs, groups, model_name, (height, width), mode)
    name = _model_name(model_name)

    written: dict[str, Any] = {"model": name, "n": n, "mode": mode, "groups": {}}
    sections = []
    for group, indices in groups.items():
        entries, items = [], []
        for rank, i in enumerate(indices):
            label, source = LABEL_NAMES[int(labels_np[i])], Path(paths[i])
            heat = upsample_map(probs[i], model_name, (height, width), mode)
            card = out_dir / group / f"{rank:03d}_{_file_stem(source)}.png"
            save_image(card, render_card(images[i], heat, source.name, label, float(scores_np[i]),
                                         float(probs[i].max()), cmap))
            entries.append({"index": int(i), "source": str(source), "label": label,
                            "score": float(scores_np[i]), "card": str(card)})
            items.append(LightboxItem(card.relative_to(out_dir), f"{source.name}\n{label}, "
                                                                 f"P(fake) {scores_np[i]:.3f}"))
        written["groups"][group] = entries
        sections.append((f"{GROUP_TITLES[group]} ({len(indices)})", items))
    figure = plot_average_heatmaps(averages, {g: len(v) for g, v in groups.items()},
                                   out_dir / "average_heatmaps.png",
                                   f"{name}: average P(fake) heatmaps, {n} easiest/hardest per class", cmap)
    sections.insert(0, ("Average heatmaps", [LightboxItem(figure.name, "average P(fake) per group")]))
    page = write_lightbox(out_dir / "heatmaps.html", sections, f"Heatmaps: {name}",
                          note=f"Each patch's P(fake) is placed at its receptive-field centre ({mode} "
                               f"interpolation between centres); the {cmap} colours always span P(fake) 0 to 1. "
                               "Easiest = most confidently correct, hardest = most wrong.")
    written.update(average_figure=str(figure), page=str(page))
    write_json(out_dir / "heatmaps.json", written)
    return written


def _read_scores(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return ([row["path"] for row in rows], np.array([int(row["label"]) for row in rows], np.int64),
                np.array([float(row["score"]) for row in rows]))
    except FileNotFoundError:
        raise InputError(f"{path}: no per-image scores; run `patchscope eval` for this test set first") from None
    except (KeyError, ValueError, OSError) as err:
        raise InputError(f"{path}: unreadable scores table, expected columns path,label,score ({err})") from None


def write_eval_heatmaps(config: EvalConfig, n: int) -> dict[str, dict[str, Any]]:
    """Heatmap pages for every test set of a finished `forensics.evaluate.evaluate(config)` run.

    Ranks images by the `scores_<name>.csv` that evaluation wrote, re-scores only the chosen ones on the
    same view (centre crop or whole resized image), and writes `<eval out>/heatmaps/<name>/heatmaps.html`
    per test set.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 image per group, got {n}")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model, meta = checkpoint.load_classifier(config.run, config.which, device)
    run = Path(config.run)
    out = Path(config.out) if config.out else (run if run.is_dir() else run.parent) / "eval"
    # The same dataset settings as evaluate(), so item i is the image that row i of the scores scored.
    sizes = scoring_view(model, meta, config.view, config.load_size, config.crop_size)
    results = {}
    for spec in config.tests:
        name, real, fake = parse_test_spec(spec)
        table = out / f"scores_{name}.csv"
        paths, labels, scores = _read_scores(table)
        dataset = data.load_split(real, fake, config.split, load_size=sizes.load_size, crop_size=sizes.input_crop,
                                  min_size=sizes.min_size, on_bad_image=config.on_bad_image, cache=False,
                                  train=False)
        if [printable_path(p) for p in dataset.paths] != paths:
            raise InputError(f"{table}: lists other images than test set {name!r} holds now; re-run eval")
        groups = select_extremes(scores, labels, n)
        chosen = sorted({i for indices in groups.values() for i in indices})
        inputs = [dataset[i][0] for i in chosen]
        step = config.batch_size
        batches = [(torch.stack(inputs[k:k + step]), torch.from_numpy(labels[chosen[k:k + step]]), None)
                   for k in range(0, len(chosen), step)]
        probs, _ = predict(model, batches, device, precision)
        # The union of the groups ranks exactly like the whole set, so the same images are chosen again.
        results[name] = write_heatmaps(to_uint8(torch.stack(inputs)), probs, labels[chosen], scores[chosen],
                                       [paths[i] for i in chosen], out / "heatmaps" / name, n, model)
    return results
