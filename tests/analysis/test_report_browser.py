"""The run report in a real browser: headless Chromium renders it without a console message, decodes every
embedded image, and its screenshot shows content, not one flat colour.

Console check: Chromium started with `--enable-logging=stderr --v=0` writes every console message of the page
(script errors, CSP or mixed-content complaints, console.* calls) to stderr as a `...:CONSOLE...` line; the report
ships no script, so any such line is a fault. A control test proves the scan sees a deliberate script error.
Images are checked in the browser itself: a copy of the page with a small probe script, dumped with --dump-dom
after loading, lists every <img> that did not decode.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from analysis.heatmaps import write_eval_heatmaps
from analysis.patches import run_patches
from analysis.report import write_report
from analysis.segment import LowLevelSegmenter
from forensics.atomic import write_text
from forensics.checkpoint import save_classifier
from forensics.evaluate import EvalConfig, evaluate
from forensics.models import build_model

CHROMIUM = ("chromium", "chromium-browser")  # Debian's package installs /usr/bin/chromium
INSTALL_TIMEOUT = 1200  # s, apt-get update + install on a slow mirror
RUN_TIMEOUT = 180       # s, one headless render
CONSOLE_LINE = re.compile(r":CONSOLE[:(]")
MIN_COLOURS = 1000      # this page renders ~3000 (plots, photos); a page with one heading ~120
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.alt);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: document.images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def _install_chromium() -> str:
    """Install Debian's chromium when this process may; the reason it could not, else ""."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root, so `apt-get install chromium` is not possible"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env,
                                    check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took longer than {INSTALL_TIMEOUT} s"
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            return f"`{' '.join(command)}` failed: {last}"
    return ""


def _find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM) if path), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = _find_chromium()
    if binary is None:
        reason = _install_chromium()
        binary = _find_chromium()
        if binary is None:
            pytest.skip(f"headless Chromium is not installed and could not be: {reason or 'not found after install'}")
    return binary


def render(chromium: str, page: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    """One headless Chromium run over `page` (its own profile folder; root needs --no-sandbox)."""
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0", *options, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if CONSOLE_LINE.search(line)]



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
    page = report.read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    result = render(chromium, probe, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, "the probe did not run: the page never finished loading"
    state = json.loads(html.unescape(found.group(1)))
    assert state == {"images": page.count("<img "), "broken": []} and state["images"] >= 8


def test_the_console_check_sees_a_script_error(chromium, tmp_path) -> None:
    page = tmp_path / "faulty.html"
    page.write_text("<!DOCTYPE html><html><body><p>text</p><script>undefinedFunction();</script></body></html>")
    result = render(chromium, page, tmp_path, "--dump-dom")
    lines = console_lines(result)
    assert len(lines) == 1 and "undefinedFunction is not defined" in lines[0]
