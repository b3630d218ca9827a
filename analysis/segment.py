"""Semantic clusters of patches: the segmenter interface, a weight-free low-level segmenter, histograms.

Used by `analysis.patches` (and the retrain comparison) to say what the most predictive patches show.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from patchscope.common.atomic import write_json
from patchscope.common.errors import InputError
from patchscope.forensics.figures import save_figure  # noqa: F401 - analysis.residual imports it from here

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive


class Segmenter(ABC):
    """Labels every pixel of a batch of images with one of `classes` (by index)."""

    name: str = "segmenter"
    classes: list[str]

    @abstractmethod
    def segment(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 RGB -> int64 N x H x W class indices into `classes`."""


def check_images(images: np.ndarray) -> np.ndarray:
    """The batch as a uint8 N x H x W x 3 array, or an InputError saying what was given."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"segmenters take uint8 N x H x W x 3 RGB images, got {images.dtype} {images.shape}")
    return images


class LowLevelSegmenter(Segmenter):
    """Flat / edge / texture labels from local gradient statistics; needs no weights, works on any image.

    Per pixel, over a `window` x `window` neighbourhood of Sobel gradients of the luminance
    (in [0, 1] per pixel; a full black-to-white step reads 0.5 beside the step):
    - flat: the RMS gradient is below `flat_threshold` (0.02 is about 5 grey levels per pixel);
    - edge: otherwise, when the gradients share one orientation, i.e. the structure-tensor
      coherence (l1 - l2) / (l1 + l2) is at least `coherence_threshold` (a step or a line gives 1);
    - texture: otherwise (gradients in many directions: noise, fine detail, grain).
    """

    name = "low-level"
    FLAT, EDGE, TEXTURE = 0, 1, 2

    def __init__(self, window: int = 7, flat_threshold: float = 0.02, coherence_threshold: float = 0.5):
        if window < 1:
            raise InputError(f"window must be at least 1 px, got {window}")
        if flat_threshold < 0 or not 0 <= coherence_threshold <= 1:
            raise InputError(f"flat_threshold must be >= 0 and coherence_threshold in [0, 1], "
                             f"got {flat_threshold} and {coherence_threshold}")
        self.window, self.flat_threshold, self.coherence_threshold = window, flat_threshold, coherence_threshold
        self.classes = ["flat", "edge", "texture"]

    def segment(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        labels = np.zeros(images.shape[:3], np.int64)
        for i, image in enumerate(images):
            labels[i] = self._segment_one(image)
        return labels

    def _segment_one(self, image: np.ndarray) -> np.ndarray:
        gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
        # Sobel sums 4 weighted differences two pixels apart: /8 makes it a per-pixel derivative.
        gx = ndimage.sobel(gray, axis=1, mode="reflect") / 8.0
        gy = ndimage.sobel(gray, axis=0, mode="reflect") / 8.0
        mean = lambda a: ndimage.uniform_filter(a, size=self.window, mode="reflect")  # noqa: E731
        jxx, jyy, jxy = mean(gx * gx), mean(gy * gy), mean(gx * gy)
        energy = jxx + jyy
        spread = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)  # l1 - l2 of the structure tensor
        coherence = np.divide(spread, energy, out=np.zeros_like(energy), where=energy > 0)
        labels = np.full(gray.shape, self.TEXTURE, np.int64)
        labels[coherence >= self.coherence_threshold] = self.EDGE
        # Running-mean filters leave ~1e-17 residues where the window has left an edge: compare squares.
        labels[energy < self.flat_threshold ** 2] = self.FLAT
        return labels


def patch_class(label_map: np.ndarray, box: Sequence[int]) -> int:
    """The class covering most pixels of `box` (top, left, bottom, right); ties go to the lowest class id."""
    top, left, bottom, right = (int(v) for v in box)
    pixels = np.asarray(label_map)[max(top, 0):bottom, max(left, 0):right]
    if pixels.size == 0:
        raise InputError(f"patch box {tuple(box)} holds no pixels of a {label_map.shape} label map")
    return int(np.argmax(np.bincount(pixels.ravel().astype(np.int64))))


def _class_id(item: Any) -> int:
    value = getattr(item, "semantic", item)
    if value is None:
        raise InputError("a patch record has no semantic class yet (run a segmenter first)")
    return int(value)


def class_histogram(items: Iterable[Any], classes: Sequence[str]) -> dict[str, int]:
    """Count of each class among `items`: class ids, or patch records with a `semantic` id."""
    ids = [_class_id(item) for item in items]
    bad = [i for i in ids if not 0 <= i < len(classes)]
    if bad:
        raise InputError(f"class id {bad[0]} is outside the {len(classes)} classes ({', '.join(classes)})")
    counts = np.bincount(np.asarray(ids, np.int64), minlength=len(classes)) if ids else np.zeros(len(classes))
    return {name: int(count) for name, count in zip(classes, counts)}


def _counts(counts: Mapping[str, int] | Sequence[int], classes: Sequence[str]) -> np.ndarray:
    if isinstance(counts, Mapping):
        return np.array([counts.get(name, 0) for name in classes], np.float64)
    values = np.asarray(counts, np.float64)
    if values.shape != (len(classes),):
        raise InputError(f"expected {len(classes)} counts (one per class), got {values.shape}")
    return values


def _fractions(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def plot_histograms(top: Mapping[str, int] | Sequence[int], baseline: Mapping[str, int] | Sequence[int],
                    classes: Sequence[str], path: str | Path,
                    title: str = "Semantic classes of the most predictive patches",
                    names: tuple[str, str] = ("most predictive patch", "random patch")) -> dict[str, Any]:
    """Grouped bars of the class fractions of top patches vs random patches; PNG at `path`, JSON beside it."""
    top_counts, base_counts = _counts(top, classes), _counts(baseline, classes)
    top_frac, base_frac = _fractions(top_counts), _fractions(base_counts)
    fig = Figure(figsize=(max(5.0, 0.6 * len(classes) + 2), 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    width = 0.4
    ax.bar(x - width / 2, top_frac, width, label=f"{names[0]} (n={int(top_counts.sum())})", color="tab:red")
    ax.bar(x + width / 2, base_frac, width, label=f"{names[1]} (n={int(base_counts.sum())})", color="tab:gray")
    ax.set_xticks(x, list(classes), rotation=45, ha="right")
    ax.set_ylabel("fraction of patches")
    ax.set_xlabel("semantic class (majority of the patch's pixels)")
    ax.set_title(title)
    # Headroom above the tallest bar keeps the legend clear of the bars.
    ax.set_ylim(0, max(1e-3, float(max(top_frac.max(initial=0), base_frac.max(initial=0)))) * 1.35)
    ax.legend(frameon=False, loc="upper right")
    save_figure(fig, path)
    summary = {"title": title, "classes": list(classes),
               "top": {"counts": dict(zip(classes, map(int, top_counts))),
                       "fractions": dict(zip(classes, map(float, top_frac)))},
               "baseline": {"counts": dict(zip(classes, map(int, base_counts))),
                            "fractions": dict(zip(classes, map(float, base_frac)))}}
    write_json(Path(path).with_suffix(".json"), summary)
    return summary
