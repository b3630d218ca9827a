"""Headless Chromium for the report tests: find (or install) it, render a page, read its console,
and check in the browser itself that every image on a page decodes.

Console check: Chromium started with `--enable-logging=stderr --v=0` writes every console message of the page
(script errors, CSP or mixed-content complaints, console.* calls) to stderr as a `...:CONSOLE...` line; the report
ships no script, so any such line is a fault. Images are checked by a copy of the page with a small probe script,
dumped with --dump-dom after loading, that lists every <img> that did not decode.
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

CHROMIUM = ("chromium", "chromium-browser")  # Debian's package installs /usr/bin/chromium
INSTALL_TIMEOUT = 1200  # s, apt-get update + install on a slow mirror
RUN_TIMEOUT = 180       # s, one headless render
CONSOLE_LINE = re.compile(r":CONSOLE[:(]")
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


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM) if path), None)


def chromium_or_skip() -> str:
    """The Chromium binary, installed first when this process may; otherwise the test is skipped."""
    binary = find_chromium()
    if binary is None:
        reason = _install_chromium()
        binary = find_chromium()
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


def image_states(chromium: str, page: Path, work: Path) -> dict:
    """{"images": how many <img> the page has, "broken": the alt texts of those that did not decode}."""
    probe = work / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    result = render(chromium, probe, work, "--dump-dom", "--virtual-time-budget=5000")
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, "the probe did not run: the page never finished loading"
    return json.loads(html.unescape(found.group(1)))
