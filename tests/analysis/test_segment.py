"""Segmenters and semantic histograms: low-level labels on synthetic images, majority rule, counts, figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchscope.analysis.segment import LowLevelSegmenter, class_histogram, patch_class, plot_histograms
from patchscope.common.errors import InputError

FLAT, EDGE, TEXTURE = LowLevelSegmenter.FLAT, LowLevelSegmenter.EDGE, LowLevelSegmenter.TEXTURE


def test_low_level_classes_are_flat_edge_texture():
    assert LowLevelSegmenter().classes == ["flat", "edge", "texture"]


def test_uniform_image_is_all_flat():
    images = np.full((2, 24, 24, 3), 77, np.uint8)
    labels = LowLevelSegmenter().segment(images)
    assert labels.shape == (2, 24, 24) and labels.dtype == np.int64
    assert (labels == FLAT).all()


def test_step_is_edge_within_reach_of_the_window_and_flat_beyond():
    image = np.zeros((1, 40, 64, 3), np.uint8)
    image[:, :, 32:] = 255  # vertical step between columns 31 and 32
    labels = LowLevelSegmenter(window=7).segment(image)[0]
    # Sobel is non-zero in columns 31 and 32; a 7-px window centred within 3 px of them sees it.
    assert (labels[:, 28:36] == EDGE).all()
    assert (labels[:, :28] == FLAT).all() and (labels[:, 36:] == FLAT).all()


def test_noise_is_texture():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    labels = LowLevelSegmenter().segment(images)
    assert not (labels == FLAT).any()
    assert (labels == TEXTURE).mean() > 0.9


def test_thresholds_are_options():
    rng = np.random.default_rng(1)
    faint = (128 + rng.integers(-2, 3, (1, 32, 32, 3))).astype(np.uint8)  # +-2 grey levels of noise
    assert (LowLevelSegmenter().segment(faint) == FLAT).all()
    assert not (LowLevelSegmenter(flat_threshold=0.001).segment(faint) == FLAT).any()


def test_segmenter_refuses_float_images():
    with pytest.raises(InputError, match="uint8 N x H x W x 3"):
        LowLevelSegmenter().segment(np.zeros((1, 8, 8, 3), np.float32))


def test_patch_class_takes_the_majority_of_the_box():
    label_map = np.zeros((10, 10), np.int64)
    label_map[:, 6:] = 2
    assert patch_class(label_map, (0, 0, 10, 10)) == 0   # 60 pixels of 0 vs 40 of 2
    assert patch_class(label_map, (0, 5, 10, 10)) == 2   # 10 of 0 vs 40 of 2
    assert patch_class(label_map, (0, 4, 10, 8)) == 0    # 20 vs 20: the lowest class id wins


def test_patch_class_tie_goes_to_lowest_id_even_when_listed_later():
    label_map = np.array([[3, 3, 1, 1]])
    assert patch_class(label_map, (0, 0, 1, 4)) == 1


def test_patch_class_of_an_empty_box_is_an_error():
    with pytest.raises(InputError, match="holds no pixels"):
        patch_class(np.zeros((4, 4), np.int64), (2, 2, 2, 4))


def test_class_histogram_counts_ids_and_sums_to_n():
    classes = ["flat", "edge", "texture"]
    ids = [0, 2, 2, 1, 2, 0, 2]
    histogram = class_histogram(ids, classes)
    assert histogram == {"flat": 2, "edge": 1, "texture": 4}
    assert sum(histogram.values()) == len(ids)


def test_class_histogram_refuses_unknown_ids():
    with pytest.raises(InputError, match="class id 3 is outside the 3 classes"):
        class_histogram([0, 3], ["a", "b", "c"])


def test_plot_histograms_writes_png_and_normalised_json(tmp_path):
    classes = ["flat", "edge", "texture"]
    summary = plot_histograms({"flat": 1, "edge": 3, "texture": 0}, [2, 1, 1], classes, tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").format == "PNG"
    stored = json.loads((tmp_path / "h.json").read_text())
    assert stored == summary
    assert stored["top"]["fractions"] == {"flat": 0.25, "edge": 0.75, "texture": 0.0}
    assert stored["baseline"]["counts"] == {"flat": 2, "edge": 1, "texture": 1}
    assert sum(stored["baseline"]["fractions"].values()) == pytest.approx(1.0)
    assert not list(tmp_path.glob(".*.tmp"))
