"""The run report: one self-contained page per run directory, built from what the stages really write —
sections in pipeline order, embedded images, escaped names, tables with the stages' numbers, errors."""
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

from patchscope.analysis.heatmaps import write_eval_heatmaps
from patchscope.analysis.patches import run_patches
from patchscope.analysis.report.build import REPORT_FILE, render_report, write_report
from patchscope.analysis.report.html import MAX_SIDE, format_value
from patchscope.analysis.report.sections import ReportContext, Section, build_heatmaps
from patchscope.analysis.segment import LowLevelSegmenter
from patchscope.common.atomic import write_json, write_text
from patchscope.common.errors import InputError
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.train import TrainConfig, fit

HOSTILE = "<script>alert(1)</script>"
SETTINGS = {"device": "cpu", "precision": "fp32"}



@pytest.fixture(scope="module")
def run(builtin_dataset, tmp_path_factory) -> dict:
    """A demo-style folder: classifier/ trained 2 epochs, eval/ with two test sets (one named like a script)
    and their heatmaps, patches/."""
    root = tmp_path_factory.mktemp("report") / "demo"
    real, fake = str(builtin_dataset / "real"), str(builtin_dataset / "fake")
    fit(TrainConfig(real=real, fake=fake, out=str(root / "classifier"), model="xception_block1", init="kaiming",
                    load_size=32, crop_size=32, batch_size=16, max_epochs=2, seed=0, **SETTINGS))
    config = EvalConfig(run=str(root / "classifier"), tests=[f"builtin={real},{fake}", f"{HOSTILE}={real},{fake}"],
                        out=str(root / "eval"), **SETTINGS)
    summary = evaluate(config)
    write_eval_heatmaps(config, 1)
    patches = run_patches(str(root / "classifier"), real, fake, out=str(root / "patches"), n=6,
                          segmenter=LowLevelSegmenter(), sheet_max=6, **SETTINGS)
    page = write_report(root)
    return {"root": root, "page": page.read_text(), "path": page, "eval": summary, "patches": patches}


def headings(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<h2[^>]*>(.*?)</h2>", page)]


def embedded_images(page: str) -> list[Image.Image]:
    images = []
    for mime, data in re.findall(r'<img[^>]* src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert Image.MIME[image.format] == mime
        images.append(image)
    return images


def table_rows(page: str) -> list[list[str]]:
    """The <td> texts of every table row (tags dropped, entities read)."""
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", page, re.S)]


def table_row(page: str, *first_cells: str) -> list[str]:
    """The cells of the first table row starting with these cells (plain text)."""
    found = [cells for cells in table_rows(page) if cells[:len(first_cells)] == list(first_cells)]
    assert found, f"no row starting with {first_cells}"
    return found[0]


# ----------------------------------------------------------------------------- the page of a run

def test_the_page_is_report_html_in_the_run_with_a_section_per_stage_in_pipeline_order(run) -> None:
    assert run["path"] == run["root"] / REPORT_FILE
    assert headings(run["page"]) == ["Key numbers", "Training: classifier", "Evaluation: eval",
                                     "Heatmaps: eval/heatmaps/builtin", f"Heatmaps: eval/heatmaps/{HOSTILE}",
                                     "Most predictive patches: patches"]
    for sub in ("Training curves", "Checkpoints", "Metrics", "Precision-recall curves", "Average heatmaps",
                "Example cards", "Semantic classes (fraction of patches)", "Where the most predictive patches sit",
                "Contents"):
        assert f"<h3>{sub}</h3>" in run["page"], sub


def test_every_image_is_embedded_as_a_data_uri_that_decodes(run) -> None:
    sources = re.findall(r'<img[^>]* src="([^"]*)"', run["page"])
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    images = embedded_images(run["page"])
    # training curve, PR curve, 2 x (average heatmaps + 4 cards), 2 contact sheets, 2 histograms, patch locations
    assert len(images) == len(sources) == 1 + 1 + 2 * 5 + 2 + 2 + 1
    assert all(image.size[0] > 100 and image.size[1] > 50 for image in images)


def test_the_page_needs_nothing_outside_itself(run) -> None:
    page = run["page"]
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("data:", "#section-")) for link in links)
    for external in ('src="http', "<link", "@import", "url(", "<script", "<iframe"):
        assert external not in page.lower(), external
    assert '<style>' in page and "<h1>patchscope report: demo</h1>" in page


def test_a_test_set_named_like_a_script_is_shown_escaped(run) -> None:
    page = run["page"]
    escaped = html.escape(HOSTILE)
    assert "<script" not in page.lower() and "alert(1)</" not in page
    assert f'<td class="name" title="{escaped}">{escaped}</td><td>after_softmax</td>' in page  # the metrics table
    assert f"<h2>Heatmaps: eval/heatmaps/{escaped}</h2>" in page  # the folder evaluation made of the name


def test_metrics_table_holds_the_evaluations_numbers_for_every_test_set_and_aggregation(run) -> None:
    for name, per_mode in run["eval"]["results"].items():
        for mode, m in per_mode.items():
            cells = table_row(run["page"], name, mode)
            expected = [m["ap"], m["ap_real"], m["roc_auc"], m["acc"], m["acc_real"], m["acc_fake"], m["patch_ap"],
                        m["patch_acc"], m["n_real"], m["n_fake"]]
            assert cells == [name, mode, *map(format_value, expected)]
    assert '<tr class="chosen"><td class="name" title="builtin">builtin</td><td>after_softmax</td>' in run["page"]


def test_training_summary_and_checkpoints_match_the_runs_files(run) -> None:
    log = [json.loads(line) for line in (run["root"] / "classifier" / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((run["root"] / "classifier" / "best.json").read_text())
    assert table_row(run["page"], "best", "xception_block1", str(best["epoch"]))[3] == format_value(best["val"]["ap"])
    page = run["page"]
    assert "<tr><th>epochs logged</th><td>2</td></tr>" in page
    assert f"<tr><th>best epoch</th><td>{log[-1]['best_epoch']}</td></tr>" in page
    assert "model: xception_block1" in page  # the resolved config.yaml, as written


def test_patch_class_fractions_are_those_of_patches_json(run) -> None:
    histograms = run["patches"]["histograms"]
    for cls in run["patches"]["classes"]:
        cells = table_row(run["page"], cls)
        assert cells[1:] == [format_value(histograms[label][who]["fractions"][cls])
                             for label in ("fake", "real") for who in ("top", "baseline")]


# ----------------------------------------------------------------------------- other layouts

def test_a_folder_with_only_a_training_log_gives_a_page_with_the_training_curve(run, tmp_path) -> None:
    shutil.copy(run["root"] / "classifier" / "metrics.jsonl", tmp_path / "metrics.jsonl")
    page = write_report(tmp_path).read_text()
    assert headings(page) == ["Training"]
    (curve,) = embedded_images(page)
    assert curve.size[0] > 2 * curve.size[1]  # three panels side by side


def test_nan_in_a_log_reads_n_a_and_a_torn_line_is_noted(tmp_path) -> None:
    lines = [{"epoch": 1, "train_loss": 0.7, "val_ap": float("nan"), "best_epoch": 1}]
    write_text(tmp_path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2, "tra')
    page = render_report(tmp_path)
    assert "<tr><th>last validation AP</th><td>n/a</td></tr>" in page
    assert "metrics.jsonl: 1 line(s) skipped" in page


def test_a_sibling_title_and_an_out_folder_are_honoured(run, tmp_path) -> None:
    path = write_report(run["root"] / "patches", out=tmp_path, title="Patches <of> run")
    assert path == tmp_path / REPORT_FILE
    page = path.read_text()
    assert "<title>Patches &lt;of&gt; run</title>" in page and headings(page) == ["Most predictive patches"]


def test_attack_studies_get_their_sections_tables_and_grids(studies) -> None:
    page = render_report(studies["root"])
    assert headings(page) == ["Key numbers", "Training: classifier", "Evaluation: eval",
                              "Heatmaps: eval/heatmaps/builtin", f"Heatmaps: eval/heatmaps/{HOSTILE}",
                              "Robustness: robustness",
                              "Most predictive patches: patches", "Spectra: spectra", "Exaggeration: exaggerate",
                              "Finetuning: finetune", "Retrain study: retrain"]
    for row in studies["exaggerate"]["rows"]:
        assert table_row(page, f"{row['k']:g}", str(row["n"]))[2] == format_value(row["p_fake"])
    before, after = studies["finetune"]["rows"]
    assert table_row(page, "original")[1] == format_value(before["ap"])
    assert table_row(page, "finetuned")[4] == format_value(after["acc"])
    assert table_row(page, "retrained classifier", "finetuned fakes")[2] == format_value(studies["eval_ap"])
    assert html.escape(studies["summary"]) in page
    assert table_row(page, "clean")[2] == format_value(studies["robustness"][0]["ap"])
    assert "<h3>Exaggeration grid</h3>" in page and "<h3>Original vs finetuned samples</h3>" in page
    assert "<h3>Fitting the shift</h3>" in page and "<h3>Finetuning log</h3>" in page


def test_an_unreadable_result_file_is_named_and_the_rest_still_shown(run, tmp_path) -> None:
    shutil.copy(run["root"] / "eval" / "pr_curve.png", tmp_path / "pr_curve.png")
    write_text(tmp_path / "metrics.json", '{"results": {"broken"')
    page = render_report(tmp_path)
    assert headings(page) == ["Evaluation"]
    assert re.search(r"metrics\.json: unreadable \((JSONDecodeError|InputError: not valid JSON)", page)
    assert len(embedded_images(page)) == 1


def test_result_files_of_an_unexpected_shape_are_named_and_what_could_be_shown_stays(run, tmp_path) -> None:
    shutil.copy(run["root"] / "patches" / "sheet_fake.png", tmp_path / "sheet_fake.png")
    write_json(tmp_path / "patches.json", {"model": "xception_block1", "histograms": {}, "classes": 5})
    page = render_report(tmp_path)
    assert headings(page) == ["Most predictive patches"]
    assert "<tr><th>model</th><td>xception_block1</td></tr>" in page
    assert "Not shown in full: the files here are not as expected (TypeError" in page


def test_a_very_large_figure_is_shrunk_before_embedding(tmp_path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (500, 4000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "spectra.png")
    (image,) = embedded_images(render_report(tmp_path))
    assert max(image.size) == MAX_SIDE and image.size[1] == round(500 * MAX_SIDE / 4000)


def test_heatmap_cards_stop_at_the_reports_cap(run) -> None:
    ctx = ReportContext(run["root"], cards_left=5)
    first, second = Section("Heatmaps", "a", ""), Section("Heatmaps", "b", "")
    build_heatmaps(run["root"] / "eval" / "heatmaps" / "builtin", ctx, first)
    build_heatmaps(run["root"] / "eval" / "heatmaps" / HOSTILE, ctx, second)
    cards = ["".join(s.parts).count('class="pixels"') for s in (first, second)]
    assert cards == [4, 1] and ctx.cards_left == 0
    assert "3 heatmap card(s) left out" in " ".join(second.notes)


def test_an_empty_folder_is_an_input_error_naming_it_and_what_was_looked_for(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: nothing to report; looked for ")) as err:
        write_report(tmp_path)
    for looked_for in ("metrics.jsonl", "patches.json", "comparison.json", "demo_summary.json"):
        assert looked_for in str(err.value)
    assert not (tmp_path / REPORT_FILE).exists()


def test_a_missing_folder_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        write_report(tmp_path / "nowhere")


@pytest.mark.parametrize("value, text", [(float("nan"), "n/a"), (None, "n/a"), (0.123456, "0.1235"), (0.0, "0.0000"),
                                         (1625.72, "1625.7"), (2.5e7, "2.5e+07"), (0.00042, "0.00042"), (7, "7"),
                                         (True, "yes"), (float("inf"), "inf")])
def test_numbers_are_formatted_for_tables(value, text) -> None:
    assert format_value(value) == text


# ----------------------------------------------------------------------------- the attack studies

@pytest.fixture(scope="module")
def studies(run, builtin_dataset, tmp_path_factory) -> dict:
    """The run plus robustness/, spectra/, exaggerate/ and finetune/ from the real stages on a tiny PGAN, and
    retrain/ assembled with the retrain study's own writers from this run's evaluation and patches."""
    from patchscope.analysis.residual import patch_histograms, plot_comparison, summary_text
    from patchscope.analysis.finetune_study import FinetuneConfig, run_finetune
    from patchscope.analysis.robustness import evaluate_robustness
    from patchscope.analysis.shift_grid import ExaggerateConfig, run_exaggerate
    from patchscope.analysis.spectra import compare_spectra
    from patchscope.attacks.retrain import CLASSIFIERS, METRIC_KEYS, TEST_SETS
    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.generators.pgan.zoo import save_pgan_zoo
    from tests.attacks.test_shift import RESOLUTION, brightness_classifier, tiny_pgan

    sources = tmp_path_factory.mktemp("studies")
    root = sources / "demo"
    shutil.copytree(run["root"], root)
    (root / REPORT_FILE).unlink()
    real, fake = builtin_dataset / "real", builtin_dataset / "fake"
    robustness = evaluate_robustness(EvalConfig(run=str(root / "classifier"), **SETTINGS), real, fake, ["jpeg:50"],
                                     root / "robustness")
    compare_spectra(real, fake, root / "spectra", max_images=8)
    generator, discriminator = tiny_pgan()
    save_pgan_zoo(generator, sources / "pgan.pt", discriminator=discriminator)
    save_classifier(sources / "detector" / "best", brightness_classifier(),
                    {"config": {"load_size": RESOLUTION, "crop_size": RESOLUTION}})
    shared = dict(generator=str(sources / "pgan.pt"), classifier=str(sources / "detector"), grid_rows=2,
                  lpips_random=True, **SETTINGS)
    exaggerate = run_exaggerate(ExaggerateConfig(out=str(root / "exaggerate"), steps=3, batch_size=4, eval_n=4,
                                                 **shared))
    finetune = run_finetune(FinetuneConfig(real=str(real), real_split="train", out=str(root / "finetune"), steps=2,
                                           batch_size=4, checkpoint_every=2, log_every=1, eval_n=4, compare_n=8,
                                           **shared))
    m = run["eval"]["results"]["builtin"]["after_softmax"]
    patches = run["patches"]
    comparison = {"aggregation": "after_softmax", "split": "test", "generator": str(root / "finetune"),
                  "metrics": {who: {name: {k: m[k] for k in METRIC_KEYS} for name in TEST_SETS} for who in CLASSIFIERS},
                  "patches": {"segmenter": patches["segmenter"], "classes": patches["classes"], "n": patches["n"],
                              "seed": 0, "histograms": patch_histograms({w: patches for w in CLASSIFIERS},
                                                                        patches["classes"])}}
    write_json(root / "retrain" / "comparison.json", comparison)
    plot_comparison(comparison, root / "retrain" / "comparison.png")
    summary = summary_text(comparison)
    write_text(root / "retrain" / "summary.txt", summary)
    return {"root": root, "exaggerate": exaggerate, "finetune": finetune, "robustness": robustness,
            "summary": summary, "eval_ap": m["ap"]}


def test_a_demo_summary_becomes_the_first_section_with_its_rows_stages_and_notes(tmp_path) -> None:
    write_text(tmp_path / "demo_summary.json", json.dumps({
        "rows": [{"name": "AP of the patch classifier (original fakes)", "value": 0.98765}],
        "stages": {"classifier": 22.46, "finetune": 43.0}, "notes": ["LPIPS used a random backbone."]}))
    page = render_report(tmp_path)
    assert "<h2>Demo summary</h2>" in page and "AP of the patch classifier (original fakes)" in page
    assert "0.9877" in page and "<td>22.46</td>" in page and "<td>43</td>" in page
    assert "LPIPS used a random backbone." in page
