"""The run report in a real browser: headless Chromium renders it without a console message, decodes every
embedded image, and its screenshot shows content, not one flat colour (helpers and method: tests/browser.py);
a 60-character test-set name wraps instead of widening the page, and captions are set large and dark as
rendered. A control test proves the console scan sees a deliberate script error.
"""
from __future__ import annotations

import html
import json
import re
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
LONG = "celebahq_pgan_256px_jpeg_quality_75_then_resized_to_128px_v2"  # 60 characters, no space to break at
LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const ink = (el) => { const s = getComputedStyle(el); return {size: parseFloat(s.fontSize), color: s.color}; };
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({
    pageWidth: document.documentElement.scrollWidth, viewWidth: document.documentElement.clientWidth,
    tablesPastBody: [...document.querySelectorAll("table")].filter(
      (t) => t.getBoundingClientRect().right > document.body.getBoundingClientRect().right + 0.5).length,
    captions: [...document.querySelectorAll("figcaption, p.caption, p.terms")].map(ink)});
  document.body.appendChild(out);
});
</script>"""


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
    config = EvalConfig(run=str(root), tests=[f"builtin={real},{fake}", f"{LONG}={real},{fake}"], device="cpu",
                        precision="fp32")
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


def layout(chromium: str, page: Path, work: Path) -> dict:
    probe = work / "layout.html"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    result = render(chromium, probe, work, "--dump-dom", "--virtual-time-budget=5000", "--window-size=1280,2000")
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="layout">(.*?)</pre>', result.stdout, re.S)
    assert found, "the probe did not run: the page never finished loading"
    return json.loads(html.unescape(found.group(1)))


def luminance(css: str) -> float:
    """Relative luminance (WCAG) of an rgb(...) colour."""
    channels = [int(v) / 255 for v in re.findall(r"\d+", css)[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_a_long_test_set_name_wraps_and_captions_are_legible(chromium, report, tmp_path) -> None:
    assert LONG in report.read_text()
    state = layout(chromium, report, tmp_path)
    assert state["pageWidth"] <= state["viewWidth"] == 1280 and state["tablesPastBody"] == 0
    assert len(state["captions"]) >= 10
    for caption in state["captions"]:
        contrast = 1.05 / (luminance(caption["color"]) + 0.05)  # against white, the lightest background used
        assert caption["size"] >= 14.5 and contrast >= 10, caption


def test_the_console_check_sees_a_script_error(chromium, tmp_path) -> None:
    page = tmp_path / "faulty.html"
    page.write_text("<!DOCTYPE html><html><body><p>text</p><script>undefinedFunction();</script></body></html>")
    result = render(chromium, page, tmp_path, "--dump-dom")
    lines = console_lines(result)
    assert len(lines) == 1 and "undefinedFunction is not defined" in lines[0]
