"""The run report in a real browser: headless Chromium renders it without a console message, decodes every
embedded image, and its screenshot shows content, not one flat colour (helpers and method: tests/browser.py).
A control test proves the console scan sees a deliberate script error.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from patchscope.analysis.heatmaps import write_eval_heatmaps
from patchscope.analysis.patches import run_patches
from patchscope.analysis.report.build import write_report
from patchscope.analysis.segment import LowLevelSegmenter
from patchscope.common.atomic import write_text
from patchscope.forensics.checkpoint import save_classifier
from patchscope.forensics.evaluate import EvalConfig, evaluate
from patchscope.forensics.models import build_model
from tests.browser import chromium_or_skip, console_lines, image_states, render

MIN_COLOURS = 1000      # this page renders ~3000 (plots, photos); a page with one heading ~120


@pytest.fixture(scope="session")
def chromium() -> str:
    return chromium_or_skip()


@pytest.fixture(scope="module")
def report(builtin_dataset, tmp_path_factory) -> Path:
    """The page of a run with a training log, evaluation, heatmaps and patches of an untrained classifier."""
    root = tmp_path_factory.mktemp("browser") / "run"
    real, fake = str(builtin_dataset / "real"), str(builtin_dataset / "fake")
    save_classifier(root / "best", build_model("xception_block1", seed=0, init="kaiming"),
                    {"epoch": 3, "config": {"load_size": None, "crop_size": None}})
    log = [{"epoch": e, "train_loss": 0.9 / e, "train_patch_acc": 0.5 + 0.1 * e, "val_patch_acc": 0.5 + 0.08 * e,
            "val_ap": 0.6 + 0.1 * e, "val_acc": 0.5 + 0.1 * e, "best_epoch": e} for e in (1, 2, 3)]
    write_text(root / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in log))
    config = EvalConfig(run=str(root), tests=[f"builtin={real},{fake}"], device="cpu", precision="fp32")
    evaluate(config)
    write_eval_heatmaps(config, 1)
    run_patches(str(root), real, fake, n=4, segmenter=LowLevelSegmenter(), sheet_max=4, device="cpu",
                precision="fp32")
    return write_report(root)


def test_the_page_renders_without_console_messages_and_shows_content(chromium, report, tmp_path) -> None:
    shot = tmp_path / "screenshot.png"
    result = render(chromium, report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_lines(result) == []
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1280 * 2000)
    assert len(colours) > MIN_COLOURS, f"only {len(colours)} colours: a blank or broken render"


def test_every_embedded_image_decodes_in_the_browser(chromium, report, tmp_path) -> None:
    state = image_states(chromium, report, tmp_path)
    assert state == {"images": report.read_text().count("<img "), "broken": []} and state["images"] >= 8


def test_the_console_check_sees_a_script_error(chromium, tmp_path) -> None:
    page = tmp_path / "faulty.html"
    page.write_text("<!DOCTYPE html><html><body><p>text</p><script>undefinedFunction();</script></body></html>")
    result = render(chromium, page, tmp_path, "--dump-dom")
    lines = console_lines(result)
    assert len(lines) == 1 and "undefinedFunction is not defined" in lines[0]
