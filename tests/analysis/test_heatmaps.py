"""Heatmaps: cell values land on their receptive-field centres; extremes, averages, files and the page."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from patchscope.analysis.grids import colour_lut
from patchscope.analysis.heatmaps import (GROUPS, average_heatmaps, collect_inputs, colourize, overlay, select_extremes,
                               upsample_map, write_eval_heatmaps, write_heatmaps)
from patchscope.analysis.lightbox import LightboxItem, write_lightbox
from patchscope.common.errors import InputError
from patchscope.forensics import data
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.models import LayerGeometry, build_model
from patchscope.forensics.receptive import cell_for_pixel, output_size, receptive_field


@pytest.mark.parametrize("model, size, cell", [
    ("xception_block1", 32, (2, 4)),   # unpadded first conv: centres at 3 + 4k, not a stretched grid
    ("xception_block2", 64, (3, 5)),
    ("resnet18_layer1", 32, (1, 6)),   # padded: centres at 4k, from pixel 0
])
def test_a_single_hot_cell_is_hottest_exactly_at_its_receptive_field_centre(model, size, cell):
    cells = output_size(model, size)
    patch_map = np.zeros((cells, cells))
    patch_map[cell] = 1.0
    heat = upsample_map(patch_map, model, size)
    rf = receptive_field(model)
    centre = (int(rf.start + rf.jump * cell[0]), int(rf.start + rf.jump * cell[1]))
    assert heat.shape == (size, size)
    assert heat[centre] == pytest.approx(1.0)
    assert set(zip(*np.nonzero(heat == heat.max()))) == {centre}  # one peak, at the centre


@pytest.mark.parametrize("model, cell, plateau", [
    ("xception_block1", (6, 2), {(y, 11) for y in range(27, 32)}),      # last row centred at 27
    ("resnet18_layer1", (0, 7), {(0, x) for x in range(28, 32)}),       # corner cell centred at (0, 28)
])
def test_an_edge_cell_peaks_at_its_centre_and_holds_its_value_only_towards_the_border(model, cell, plateau):
    cells = output_size(model, 32)
    patch_map = np.zeros((cells, cells))
    patch_map[cell] = 1.0
    heat = upsample_map(patch_map, model, 32)
    assert set(zip(*np.nonzero(np.isclose(heat, 1.0)))) == plateau


def test_the_heatmap_is_not_the_map_stretched_over_the_image():
    # 7 cells over 32 px: stretching puts the last cell near pixel 29; its patch is centred at 27.
    patch_map = np.zeros((7, 7))
    patch_map[3, 6] = 1.0
    stretched = F.interpolate(torch.tensor(patch_map)[None, None], size=(32, 32), mode="bilinear")[0, 0]
    assert int(stretched[15].argmax()) != 27
    assert int(np.argmax(upsample_map(patch_map, "xception_block1", 32)[15])) == 27


def test_half_pixel_centres_share_the_peak_between_two_pixels():
    layers = [LayerGeometry(kernel=2, stride=2, padding=0)]  # cells centred at 0.5, 2.5, 4.5, 6.5
    patch_map = np.zeros((4, 4))
    patch_map[1, 2] = 1.0
    heat = upsample_map(patch_map, layers, 8)
    peak = heat.max()
    assert peak == pytest.approx(0.75 * 0.75)
    assert set(zip(*np.nonzero(np.isclose(heat, peak)))) == {(2, 4), (2, 5), (3, 4), (3, 5)}


def test_values_are_interpolated_linearly_between_centres_and_held_beyond_the_edge_ones():
    rf = receptive_field("xception_block2")
    patch_map = np.tile(np.arange(4.0), (4, 1))  # value = column index
    heat = upsample_map(patch_map, "xception_block2", 32)
    expected = np.clip((np.arange(32) - rf.start) / rf.jump, 0, 3)
    np.testing.assert_allclose(heat[10], expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_a_uniform_map_gives_a_uniform_heatmap(mode):
    heat = upsample_map(np.full((2, 8, 8), 0.37), "resnet18_layer1", 32, mode=mode)
    np.testing.assert_allclose(heat, 0.37, atol=1e-6)


def test_nearest_mode_paints_each_pixel_with_the_cell_receptive_arithmetic_assigns():
    model, size = "xception_block1", 32
    cells = output_size(model, size)
    patch_map = np.arange(cells * cells, dtype=np.float64).reshape(cells, cells)
    heat = upsample_map(patch_map, model, size, mode="nearest")
    for y in range(size):
        for x in range(size):
            assert heat[y, x] == patch_map[cell_for_pixel(model, y, x, size)], (y, x)


def test_a_patch_map_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="5x5 but xception_block2 gives 4x4 cells for 32x32 px"):
        upsample_map(np.zeros((5, 5)), "xception_block2", 32)


def test_colours_use_the_fixed_zero_to_one_range():
    lut = colour_lut("jet")
    colours = colourize(np.array([[-0.2, 0.0, 0.5, 1.0, 1.7]]))
    np.testing.assert_array_equal(colours[0], lut[[0, 0, 128, 255, 255]])  # not rescaled to the map's range
    grey = np.full((32, 32, 3), 100, np.uint8)
    patch_map = np.zeros((4, 4))
    patch_map[2, 1] = 1.0
    blended = overlay(grey, upsample_map(patch_map, "xception_block2", 32))
    np.testing.assert_array_equal(blended[19, 11], np.rint(0.5 * 100 + 0.5 * lut[255]).astype(np.uint8))
    np.testing.assert_array_equal(blended[0, 31], np.rint(0.5 * 100 + 0.5 * lut[0]).astype(np.uint8))


SCORES = [0.1, 0.9, 0.5, 0.5, 0.2, 0.8, 0.8, 0.3]
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]


def test_extremes_rank_by_confidence_in_the_true_class_with_ties_in_index_order():
    assert select_extremes(SCORES, LABELS, 2) == {
        "real_easy": [0, 2], "real_hard": [1, 2], "fake_easy": [5, 6], "fake_hard": [4, 7]}
    assert select_extremes(SCORES, LABELS, 3) == {
        "real_easy": [0, 2, 3], "real_hard": [1, 2, 3], "fake_easy": [5, 6, 7], "fake_hard": [4, 7, 5]}


def test_extremes_of_a_small_class_take_all_of_it_and_n_zero_takes_none():
    chosen = select_extremes([0.4, 0.6, 0.7], [0, 1, 1], 5)
    assert chosen == {"real_easy": [0], "real_hard": [0], "fake_easy": [2, 1], "fake_hard": [1, 2]}
    assert select_extremes(SCORES, LABELS, 0) == {group: [] for group in GROUPS}


def test_the_union_of_the_groups_ranks_like_the_whole_set():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 200) / 5.0  # many ties
    labels = rng.integers(0, 2, 200)
    full = select_extremes(scores, labels, 7)
    chosen = sorted({i for group in full.values() for i in group})
    again = select_extremes(scores[chosen], labels[chosen], 7)
    assert {g: [chosen[i] for i in v] for g, v in again.items()} == full


@pytest.mark.parametrize("scores, labels, message", [
    ([0.1, float("nan")], [0, 1], "NaN"), ([0.1], [0, 1], "1 scores but 2 labels"), ([0.1], [2], "0 \\(real\\)"),
])
def test_bad_extreme_inputs_are_refused(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        select_extremes(scores, labels, 1)


def test_average_heatmap_is_the_mean_of_the_chosen_upsampled_maps():
    rng = np.random.default_rng(0)
    probs = rng.random((6, 4, 4))
    groups = {"real_easy": [0, 3, 5], "real_hard": [], "fake_easy": [2], "fake_hard": [1, 4]}
    averages = average_heatmaps(probs, groups, "xception_block2", 32)
    assert averages["real_hard"] is None
    for group in ("real_easy", "fake_easy", "fake_hard"):
        each = upsample_map(probs[groups[group]], "xception_block2", 32)
        np.testing.assert_allclose(averages[group], each.mean(axis=0), atol=1e-6)


def _heatmap_inputs(count: int = 8):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    probs = rng.random((count, 4, 4))
    labels = np.array([0, 1] * (count // 2))
    scores = probs.mean(axis=(1, 2))
    scores[2] = 0.99  # the hardest real: its name must be escaped on the page
    paths = [f"/data/{'real' if y == 0 else 'fake'}/img {i}.png" for i, y in enumerate(labels)]
    paths[2] = "/data/real/<script>.png"
    return images, probs, labels, scores, paths


def test_write_heatmaps_writes_valid_pngs_a_figure_and_an_escaped_page(tmp_path):
    images, probs, labels, scores, paths = _heatmap_inputs()
    written = write_heatmaps(images, probs, labels, scores, paths, tmp_path, 2, "xception_block2", 32)
    expected = select_extremes(scores, labels, 2)
    assert {g: [e["index"] for e in entries] for g, entries in written["groups"].items()} == expected
    cards = [entry["card"] for entries in written["groups"].values() for entry in entries]
    for png in cards + [written["average_figure"]]:
        with Image.open(png) as image:
            assert image.format == "PNG"
            image.verify()
    page = (tmp_path / "heatmaps.html").read_text()
    assert "<script>.png" not in page and page.count("<script>") == 1  # only the page's own script
    assert "&lt;script&gt;.png<br>real, P(fake) 0.990" in page  # the caption names the real file
    for card in cards:  # card names are sanitised copies of the file names, so they need no quoting
        assert f'src="{Path(card).relative_to(tmp_path).as_posix()}"' in page
    assert json.loads((tmp_path / "heatmaps.json").read_text())["groups"] == written["groups"]


def test_write_heatmaps_refuses_mismatched_inputs(tmp_path):
    images, probs, labels, scores, paths = _heatmap_inputs()
    with pytest.raises(ValueError, match="one image, patch map, label and score per path"):
        write_heatmaps(images[:-1], probs, labels, scores, paths, tmp_path, 1, "xception_block2")
    with pytest.raises(ValueError, match="input_size 64 differs from the images"):
        write_heatmaps(images, probs, labels, scores, paths, tmp_path, 1, "xception_block2", 64)
    with pytest.raises(ValueError, match="patch map is 4x4 but xception_block1 gives 7x7"):
        write_heatmaps(images, probs, labels, scores, paths, tmp_path, 1, "xception_block1")


def test_collect_inputs_returns_the_centre_crops_the_classifier_sees(builtin_dataset):
    dataset = data.load_split(builtin_dataset / "real", builtin_dataset / "fake", "test", crop_size=24)
    inputs = collect_inputs(dataset, [0, len(dataset) - 1])
    assert inputs.shape == (2, 24, 24, 3) and inputs.dtype == np.uint8
    np.testing.assert_array_equal(inputs[0], data.read_image(dataset.path(0))[4:28, 4:28])
    np.testing.assert_array_equal(inputs[1], data.read_image(dataset.path(len(dataset) - 1))[4:28, 4:28])
    training = data.load_split(builtin_dataset / "real", builtin_dataset / "fake", "test", crop_size=24, train=True)
    with pytest.raises(ValueError, match="eval mode"):
        collect_inputs(training, [0])


@pytest.fixture(scope="module")
def evaluated_run(builtin_dataset, tmp_path_factory):
    """A random-weight classifier evaluated on the built-in test split (scores_b.csv written)."""
    root = tmp_path_factory.mktemp("evaluated")
    save_classifier(root / "run" / "best", build_model("xception_block1", seed=0),
                    {"config": {"load_size": 32, "crop_size": 32}})
    config = EvalConfig(run=str(root / "run"), tests=[f"b={builtin_dataset / 'real'},{builtin_dataset / 'fake'}"],
                        out=str(root / "eval"), device="cpu", batch_size=32)
    evaluate(config)
    return config


def test_eval_heatmaps_show_the_images_the_scores_table_ranks(evaluated_run):
    out = Path(evaluated_run.out)
    written = write_eval_heatmaps(evaluated_run, 2)["b"]
    with open(out / "scores_b.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = select_extremes([float(r["score"]) for r in rows], [int(r["label"]) for r in rows], 2)
    for group, indices in chosen.items():
        assert [e["source"] for e in written["groups"][group]] == [rows[i]["path"] for i in indices]
        assert [e["score"] for e in written["groups"][group]] == [float(rows[i]["score"]) for i in indices]
    assert written["page"] == str(out / "heatmaps" / "b" / "heatmaps.html") and Path(written["page"]).is_file()


def test_eval_heatmaps_refuse_a_scores_table_of_other_images(evaluated_run, tmp_path):
    lines = (Path(evaluated_run.out) / "scores_b.csv").read_text().splitlines()
    (tmp_path / "scores_b.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one image fewer
    with pytest.raises(InputError, match="scores_b.csv: lists other images than test set 'b'"):
        write_eval_heatmaps(replace(evaluated_run, out=str(tmp_path)), 1)


def test_eval_heatmaps_without_a_scores_table_say_to_run_eval_first(evaluated_run, tmp_path):
    with pytest.raises(InputError, match="scores_b.csv: no per-image scores; run `patchscope eval`"):
        write_eval_heatmaps(replace(evaluated_run, out=str(tmp_path)), 1)


def test_lightbox_escapes_names_and_captions_and_quotes_links(tmp_path):
    page = write_lightbox(tmp_path / "page.html", [
        ("<b>cards</b>", [LightboxItem("imgs/<script>.png", "<script>.png\nP(fake) 0.93"),
                          LightboxItem("a b#c?.png", 'say "hi" & bye')]),
        ("empty", []),
    ], title="<i>title</i>").read_text()
    assert "<script>.png" not in page and "<b>" not in page and "<i>" not in page
    assert page.count("<script>") == 1
    assert 'src="imgs/%3Cscript%3E.png"' in page and 'src="a%20b%23c%3F.png"' in page
    assert "&lt;script&gt;.png<br>P(fake) 0.93" in page and "say &quot;hi&quot; &amp; bye" in page
    assert "&lt;i&gt;title&lt;/i&gt;" in page and "(none)" in page
