"""What a researcher reads first and looks for in the report: the key-numbers table (numbers equal to the run's
files), where the most predictive patches sit (border and corner shares against area, on hand-built locations),
equal curves told apart, long test-set names, terms explained, study folders named once, the average heatmap large.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from patchscope.analysis.report import locations
from patchscope.analysis.report.build import render_report
from patchscope.analysis.report.curves import coinciding, curve_style, pr_figure
from patchscope.analysis.report.html import format_short, format_value
from patchscope.common.atomic import write_json
from patchscope.forensics.evaluate import EvalConfig, evaluate
from tests.analysis.test_report import (SETTINGS, embedded_images, headings, run, studies,  # noqa: F401 (fixtures)
                                        table_row, table_rows)

LONG = "celebahq_pgan_256px_jpeg_quality_75_then_resized_to_128px_v2"


def summary_rows(page: str) -> list[list[str]]:
    block = re.search(r'<table class="summary">(.*?)</table>', page, re.S)
    assert block, "no key-numbers table"
    return [cells for cells in table_rows(block.group(1)) if cells]


def visible_text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


@pytest.fixture(scope="module")
def long_named(run, builtin_dataset, tmp_path_factory) -> dict:
    """An evaluation of the run's classifier on one test set under a short and a 60-character name."""
    assert len(LONG) == 60
    root = tmp_path_factory.mktemp("long") / "run"
    real, fake = builtin_dataset / "real", builtin_dataset / "fake"
    evaluate(EvalConfig(run=str(run["root"] / "classifier"), tests=[f"short={real},{fake}", f"{LONG}={real},{fake}"],
                        out=str(root / "eval"), **SETTINGS))
    return {"root": root, "page": render_report(root)}


# ----------------------------------------------------------------------------- key numbers

def test_the_key_numbers_open_the_page_and_equal_the_numbers_in_the_run_files(studies) -> None:
    root = studies["root"]
    page = render_report(root)
    assert headings(page)[0] == "Key numbers"
    assert page.index('<a href="#section-summary">Key numbers</a>') < page.index('href="#section-1"')
    rows = summary_rows(page)
    evaluation = json.loads((root / "eval" / "metrics.json").read_text())
    chosen = evaluation["aggregation"]
    expected = [["Evaluation: eval", f"test set {name} ({m['n_real']} real, {m['n_fake']} fake)", chosen,
                 format_value(m["ap"]), format_value(m["acc"])]
                for name, m in ((name, per[chosen]) for name, per in evaluation["results"].items())]
    shift = json.loads((root / "exaggerate" / "metrics.json").read_text())
    low = min(shift["rows"], key=lambda r: r["p_fake"])
    high = max(shift["rows"], key=lambda r: r["p_fake"])
    before, after = json.loads((root / "finetune" / "before_after.json").read_text())["rows"]
    comparison = json.loads((root / "retrain" / "comparison.json").read_text())
    old, new = (comparison["metrics"][who]["finetuned"] for who in ("old", "new"))
    assert rows[:len(expected)] == expected
    exaggeration, finetuning, *retrain = rows[len(expected):]
    assert exaggeration[0] == "Exaggeration: exaggerate" and exaggeration[3] == (
        f"mean P(fake) from {format_value(low['p_fake'])} (k = {format_short(low['k'])}) to "
        f"{format_value(high['p_fake'])} (k = {format_short(high['k'])})")
    assert finetuning[0] == "Finetuning: finetune" and finetuning[3:] == [
        f"{format_value(before['ap'])} → {format_value(after['ap'])}",
        f"{format_value(before['acc'])} → {format_value(after['acc'])}"]
    assert [r[0] for r in retrain] == ["Retrain study: retrain"] * 2
    assert [r[3:] for r in retrain] == [[format_value(m["ap"]), format_value(m["acc"])] for m in (old, new)]
    assert "retrained classifier" in retrain[1][1] and "old classifier" in retrain[0][1]


def test_only_the_studies_present_get_rows_and_a_training_log_alone_gets_no_table(run, tmp_path) -> None:
    assert {row[0] for row in summary_rows(run["page"])} == {"Evaluation: eval"}
    shutil.copy(run["root"] / "classifier" / "metrics.jsonl", tmp_path / "metrics.jsonl")
    assert "Key numbers" not in render_report(tmp_path)


# ----------------------------------------------------------------------------- where the top patches sit

GRID = locations.Layout(height=100, width=100, rows=10, cols=10, rf_size=10, jump=10, start=4.5)  # centres 5..95


def record(row: int, col: int, label: int = 1) -> dict:
    return {"row": row, "col": col, "label": label, "box": [row * 10, col * 10, row * 10 + 10, col * 10 + 10]}


def test_border_and_corner_shares_of_hand_built_locations() -> None:
    # band = one receptive field, 10 px: rows/cols 0 and 9 are border; (0,0) and (9,9) corners, (5,5) inside
    chosen = [record(0, 0), record(0, 5), record(5, 5), record(9, 9), record(4, 9)]
    assert locations.shares(chosen, GRID) == {"n": 5, "border": 0.8, "corner": 0.4}
    assert GRID.expected() == pytest.approx((1 - 0.8 ** 2, 4 / 100))
    grid = locations.counts(chosen + [record(0, 0)], GRID)
    assert grid.sum() == 6 and grid[0, 0] == 2 and grid[5, 5] == 1
    # Without jump and start, the centres come from the pixel boxes: the same answer here.
    boxes_only = locations.Layout(height=100, width=100, rows=10, cols=10, rf_size=10)
    assert locations.shares(chosen, boxes_only) == {"n": 5, "border": 0.8, "corner": 0.4}


def test_on_a_small_image_the_band_is_capped_at_a_quarter_of_the_side() -> None:
    # xception_block1 at 32 px: 7 x 7 cells centred at 3, 7, ..., 27; a 19 px band would hold them all.
    small = locations.Layout(height=32, width=32, rows=7, cols=7, rf_size=19, jump=4, start=3.0)
    assert small.band == 8
    border_rows = [r for r in range(7) if small.place(3 + 4 * r + 0.5, 16)[0]]
    assert border_rows == [0, 1, 6]
    assert small.expected() == pytest.approx((1 - (4 / 7) ** 2, 9 / 49))


def test_the_patches_section_shows_the_shares_and_the_location_heatmap(tmp_path) -> None:
    top = [record(0, 0), record(0, 5), record(5, 5), record(9, 9), record(4, 9)] + [record(0, 0, 0), record(5, 5, 0)]
    write_json(tmp_path / "patches.json", {
        "model": "custom", "input_size": [100, 100], "output_size": [10, 10],
        "receptive_field": {"size": 10, "jump": 10, "start": 4.5}, "classes": [], "histograms": {},
        "top": top, "random": [record(5, 5), record(5, 6), record(9, 0), record(2, 2), record(3, 3), record(1, 1, 0),
                               record(0, 9, 0)]})
    page = render_report(tmp_path)
    assert table_row(page, "fake: most predictive")[1:4] == ["5", "80.0%", "40.0%"]
    assert table_row(page, "fake: most predictive")[4].startswith("row 0, col 0 (centre y 4.5, x 4.5 px): 20.0%")
    assert table_row(page, "fake: random")[1:4] == ["5", "20.0%", "20.0%"]
    assert table_row(page, "real: most predictive")[1:4] == ["2", "50.0%", "50.0%"]
    assert table_row(page, "expected from area")[1:4] == ["100", "36.0%", "4.0%"]
    assert "within 10 px (one receptive field) of an image edge" in page
    (heatmap,) = embedded_images(page)
    assert heatmap.size[0] > heatmap.size[1] > 200  # fake and real side by side


# ----------------------------------------------------------------------------- curves

def test_equal_curves_get_distinct_styles_and_are_named_as_coinciding(long_named) -> None:
    styles = [curve_style(i) for i in range(8)]
    assert len({s["color"] for s in styles}) == len({s["marker"] for s in styles}) == 8
    assert len({str(s["linestyle"]) for s in styles}) == 6
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    figure, groups = pr_figure({"a": (scores, labels), "b": (scores, labels), "c": (1 - scores, labels)}, "t")
    a, b, c = figure.axes[0].get_lines()
    assert groups == [["a", "b"]]
    np.testing.assert_array_equal(a.get_xydata(), b.get_xydata())
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
    assert a.get_color() != b.get_color() and "= a" in b.get_label()
    assert coinciding({"x": ([0, 1], [1, np.nan]), "y": ([0, 1], [1, np.nan]), "z": ([0, 1], [1, 0])}) == [["x", "y"]]
    page = visible_text(long_named["page"])
    assert f"The curves of test sets short and {LONG} coincide" in page


# ----------------------------------------------------------------------------- long names, terms, folders, heatmap

def test_a_60_character_test_set_name_keeps_the_metrics_table_aligned(long_named) -> None:
    page = long_named["page"]
    rows = {name: [cells for cells in table_rows(page) if cells and cells[0] == name] for name in ("short", LONG)}
    assert len(rows["short"]) == len(rows[LONG]) == 3
    assert {len(cells) for cells in rows["short"] + rows[LONG]} == {12}
    cell = re.compile(r'<td class="name" title="([^"]*)">([^<]*)</td><td>after_softmax</td><td>')  # metrics table
    assert sorted(cell.findall(page)) == [(LONG, LONG), ("short", "short")]
    assert re.search(r"td\.name \{[^}]*max-width: 18em;[^}]*overflow-wrap: anywhere", page)


def test_jargon_is_explained_where_it_appears(studies) -> None:
    page = render_report(studies["root"])
    terms = re.findall(r'<p class="terms">(.*?)</p>', page)
    assert any("<b>random</b>: one patch per kept image" in t and "&quot;N random&quot; counts" in t for t in terms)
    assert any("<b>AP (real+)</b>" in t and "<b>after_softmax</b>" in t for t in terms)
    assert any("<b>k</b>: step along the learned latent shift" in t for t in terms)
    assert re.search(r'<th title="average precision with real as the positive class[^"]*">AP \(real\+\)</th>', page)


def test_a_study_folder_named_like_its_kind_is_named_once(run, studies, tmp_path) -> None:
    study = tmp_path / "retrain"
    shutil.copytree(run["root"] / "classifier", study / "retrain" / "classifier")
    shutil.copytree(run["root"] / "eval", study / "retrain" / "eval" / "old", ignore=shutil.ignore_patterns("heatmaps"))
    shutil.copy(studies["root"] / "retrain" / "comparison.json", study / "comparison.json")
    page = render_report(tmp_path)
    assert headings(page) == ["Key numbers", "Training: retrain/classifier", "Evaluation: retrain/eval/old",
                              "Retrain study: retrain"]
    assert '<h2 title="folder retrain/retrain/classifier">Training: retrain/classifier</h2>' in page
    toc = re.search(r"<nav>(.*?)</nav>", page, re.S).group(1)
    assert "retrain/retrain" not in toc and "retrain/retrain" not in "".join(headings(page))
    # The study's own evaluations are left to its rows.
    assert [row[0] for row in summary_rows(page)] == ["Retrain study: retrain"] * 2


def test_the_average_heatmap_is_shown_large(run) -> None:
    page = run["page"]
    figures = re.findall(r'<figure class="wide"><img src="data:image/png;base64,([^"]+)" alt="Average P\(fake\)', page)
    assert len(figures) == 2
    with Image.open(io.BytesIO(base64.b64decode(figures[0]))) as image:
        width, height = image.size
    assert width >= 900 and height >= 0.8 * width  # two panels a row: each map about 400 px
    assert re.search(r"figure\.wide img \{ width: min\(100%, 1100px\); \}", page)


def test_captions_are_set_large_and_dark_enough(run) -> None:
    style = re.search(r"figcaption \{([^}]*)\}", run["page"]).group(1)
    size = float(re.search(r"font-size: ([0-9.]+)em", style).group(1))
    colour = re.search(r"color: #([0-9a-f]{6})", style).group(1)
    assert size >= 0.95 and max(int(colour[i:i + 2], 16) for i in (0, 2, 4)) <= 0x40


def test_an_implausible_patch_geometry_is_named_not_computed(tmp_path) -> None:
    write_json(tmp_path / "patches.json", {"model": "custom", "input_size": [10**9, 10**9], "output_size": [10**8, 10**8],
                                           "classes": [], "histograms": {}, "top": [record(0, 0)]})
    page = render_report(tmp_path)
    assert "Patch locations not shown: patches.json lacks their geometry (ValueError: implausible geometry" in page
    assert "<h3>Where the most predictive patches sit</h3>" not in page
