"""Most predictive patches: true-class cells, receptive-field boxes, ranking and ties, baselines, outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchscope.analysis.patches import (PADDING_GRAY, best_cells, crop_patch, model_input_pixels, patch_tile,
                              random_patches, run_patches, top_patches)
from patchscope.analysis.segment import LowLevelSegmenter
from patchscope.common.errors import InputError
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.data import load_split
from patchscope.forensics.models import build_model
from patchscope.forensics.receptive import output_size, patch_boxes, receptive_field

MODEL = "xception_block1"
SIZE = 32


def _maps(n: int, seed: int = 0) -> np.ndarray:
    side = output_size(MODEL, SIZE)
    return np.random.default_rng(seed).uniform(0.01, 0.99, (n, side, side)).astype(np.float32)


def test_fake_picks_its_highest_and_real_its_lowest_p_fake_cell():
    probs = _maps(2)
    probs[0, 3, 4], probs[0, 6, 1] = 0.999, 0.001  # image 0 is real: wants the 0.001 cell
    probs[1, 3, 4], probs[1, 6, 1] = 0.999, 0.001  # image 1 is fake: wants the 0.999 cell
    records = top_patches(probs, [0, 1], MODEL, SIZE, n=1)
    by_index = {r.index: r for r in records}
    assert (by_index[0].row, by_index[0].col) == (6, 1)
    assert (by_index[1].row, by_index[1].col) == (3, 4)
    assert by_index[0].prob == pytest.approx(0.999) and by_index[1].prob == pytest.approx(0.999)


def test_boxes_are_the_receptive_field_boxes_of_the_chosen_cells():
    probs = _maps(6, seed=1)
    labels = [0, 0, 0, 1, 1, 1]
    boxes = patch_boxes(MODEL, SIZE)
    records = top_patches(probs, labels, MODEL, SIZE, n=3) + random_patches(probs, labels, MODEL, SIZE, seed=4)
    for record in records:
        assert record.box == tuple(boxes[record.row, record.col].tolist())


def test_ties_within_an_image_go_to_the_first_cell_in_row_major_order():
    probs = np.full((2, 4, 4), 0.5, np.float32)
    probs[0, 1, 2] = probs[0, 3, 0] = 0.9
    probs[1, 2, 3] = probs[1, 2, 1] = 0.1
    rows, cols = best_cells(probs, np.array([1, 0]))
    assert (rows.tolist(), cols.tolist()) == ([1, 2], [2, 1])


def test_top_n_is_ordered_by_true_class_probability_with_ties_by_index():
    side = output_size(MODEL, SIZE)
    best = [0.7, 0.9, 0.7, 0.95, 0.7]  # P(fake) of each fake image's best cell
    probs = np.full((5, side, side), 0.05, np.float32)
    for i, value in enumerate(best):
        probs[i, 2, 2] = value
    records = top_patches(probs, [1] * 5, MODEL, SIZE, n=4, per_class=False)
    assert [r.index for r in records] == [3, 1, 0, 2]  # 0.95, 0.9, then the 0.7 tie by index


def test_per_class_keeps_n_of_each_class_reals_first():
    probs = _maps(10, seed=2)
    labels = [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    records = top_patches(probs, labels, MODEL, SIZE, n=2, per_class=True)
    assert [r.label for r in records] == [0, 0, 1, 1]
    for label in (0, 1):
        ours = [r for r in records if r.label == label]
        others = [r for r in top_patches(probs, labels, MODEL, SIZE, n=10, per_class=True)
                  if r.label == label and r not in ours]
        assert ours[0].prob >= ours[1].prob >= max(r.prob for r in others)
    overall = top_patches(probs, labels, MODEL, SIZE, n=3, per_class=False)
    assert len(overall) == 3 and [r.prob for r in overall] == sorted((r.prob for r in overall), reverse=True)


def test_one_patch_per_image():
    records = top_patches(_maps(8, seed=3), [0, 1] * 4, MODEL, SIZE, n=8, per_class=False)
    assert sorted(r.index for r in records) == list(range(8))


def test_random_patches_depend_on_seed_and_image_only():
    probs, labels = _maps(12, seed=5), [0] * 6 + [1] * 6
    first = random_patches(probs, labels, MODEL, SIZE, seed=7)
    again = random_patches(probs, labels, MODEL, SIZE, seed=7)
    other = random_patches(probs, labels, MODEL, SIZE, seed=8)
    subset = random_patches(probs, labels, MODEL, SIZE, seed=7, indices=[9, 2])
    cells = lambda records: [(r.index, r.row, r.col) for r in records]  # noqa: E731
    assert cells(first) == cells(again)
    assert cells(first) != cells(other)
    assert cells(subset) == [cells(first)[9], cells(first)[2]]
    assert all(r.prob == pytest.approx(probs[r.index, r.row, r.col] if r.label else 1 - probs[r.index, r.row, r.col])
               for r in first)


def test_maps_that_do_not_fit_the_model_are_refused():
    with pytest.raises(InputError, match="do not fit the model"):
        top_patches(np.zeros((1, 3, 3)), [0], MODEL, SIZE, n=1)


def test_tile_shows_the_crop_where_it_lies_in_the_window_and_padding_gray():
    image = np.arange(SIZE * SIZE * 3, dtype=np.int64).reshape(SIZE, SIZE, 3).astype(np.uint8)
    rf = receptive_field(MODEL)
    probs = np.full((1, output_size(MODEL, SIZE), output_size(MODEL, SIZE)), 0.1, np.float32)
    probs[0, 0, 0] = 0.9  # cell (0, 0): its window starts in the padding
    record = top_patches(probs, [1], MODEL, SIZE, n=1)[0]
    tile = patch_tile(image, record, rf)
    top, left = record.box[0] - rf.first_edge, record.box[1] - rf.first_edge
    crop = crop_patch(image, record.box)
    assert tile.shape == (rf.size, rf.size, 3) and top > 0 and left > 0
    np.testing.assert_array_equal(tile[top:top + crop.shape[0], left:left + crop.shape[1]], crop)
    assert (tile[:top] == PADDING_GRAY).all() and (tile[:, :left] == PADDING_GRAY).all()


@pytest.fixture(scope="module")
def patch_run(builtin_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    model = build_model(MODEL, seed=0, init="kaiming")  # kaiming: probabilities spread away from 0.5
    save_classifier(root / "run" / "best", model, {"epoch": 1, "config": {"load_size": None, "crop_size": None}})
    summary = run_patches(str(root / "run"), str(builtin_dataset / "real"), str(builtin_dataset / "fake"),
                          n=10, segmenter=LowLevelSegmenter(), device="cpu", precision="fp32",
                          sheet_max=6, seed=3)
    return root, summary


def test_run_writes_crops_sheets_histograms_and_positions(patch_run):
    root, summary = patch_run
    out = root / "run" / "patches"
    assert summary["out"] == str(out)
    for name in ("patches.json", "config.yaml", "sheet_real.png", "sheet_fake.png", "histogram_real.png",
                 "histogram_fake.png", "histogram_real.json", "histogram_fake.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "crops" / "real").glob("*.png"))) == 10
    assert len(list((out / "crops" / "fake").glob("*.png"))) == 10
    stored = json.loads((out / "patches.json").read_text())
    assert len(stored["top"]) == len(stored["random"]) == 20
    assert [r["index"] for r in stored["top"]] == [r["index"] for r in stored["random"]]
    assert stored["classes"] == ["flat", "edge", "texture"] and stored["segmenter"] == "low-level"
    assert not list(out.rglob(".*.tmp"))


def test_run_histograms_sum_to_n_per_class(patch_run):
    _, summary = patch_run
    for name in ("real", "fake"):
        histogram = summary["histograms"][name]
        assert sum(histogram["top"]["counts"].values()) == 10
        assert sum(histogram["baseline"]["counts"].values()) == 10
        ours = [r["semantic"] for r in summary["top"] if r["label"] == (name == "fake")]
        assert histogram["top"]["counts"] == {c: ours.count(i) for i, c in enumerate(summary["classes"])}


def test_run_crops_are_the_model_input_pixels_of_the_boxes(patch_run, builtin_dataset):
    root, summary = patch_run
    dataset = load_split(builtin_dataset / "real", builtin_dataset / "fake", "test", cache=False)
    boxes = patch_boxes(MODEL, SIZE)
    for record in summary["top"][:3] + summary["top"][-3:]:
        assert tuple(record["box"]) == tuple(boxes[record["row"], record["col"]].tolist())
        crop = np.asarray(Image.open(root / "run" / "patches" / record["crop"]))
        np.testing.assert_array_equal(crop, crop_patch(model_input_pixels(dataset, record["index"]), record["box"]))


def test_run_patches_agree_with_the_classifier_maps(patch_run, builtin_dataset):
    root, summary = patch_run
    from patchscope.forensics.checkpoint import load_classifier
    model, _ = load_classifier(root / "run")
    dataset = load_split(builtin_dataset / "real", builtin_dataset / "fake", "test", cache=False)
    record = summary["top"][-1]  # a fake: its cell holds the highest P(fake) of its image
    with torch.no_grad():
        p_fake = torch.softmax(model(dataset[record["index"]][0][None]), dim=1)[0, 1]
    assert record["label"] == 1 and record["prob"] == pytest.approx(float(p_fake.max()), abs=1e-5)
    assert (record["row"], record["col"]) == np.unravel_index(int(p_fake.argmax()), p_fake.shape)


def test_rerun_without_force_is_refused(patch_run, builtin_dataset):
    root, _ = patch_run
    with pytest.raises(InputError, match="patches.json exists; pass --force"):
        run_patches(str(root / "run"), str(builtin_dataset / "real"), str(builtin_dataset / "fake"), n=2,
                    device="cpu")
