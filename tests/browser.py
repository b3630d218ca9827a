"""Headless Chromium for the report tests: find it (installed by `make browser`), render a page, read its console,
and check in the browser itself that every image on a page decodes.

Console check: Chromium started with `--enable-logging=stderr --v=0` writes every console message of the page
(script errors, CSP or mixed-content complaints, console.* calls) to stderr as a `...:CONSOLE...` line; the report
ships no script, so any such line is a fault. Images are checked by a copy of the page with a small probe script,
dumped with --dump-dom after loading, that lists every <img> that did not decode.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = ("chromium", "chromium-browser")  # Debian's package (`make browser`) installs /usr/bin/chromium
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


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM) if path), None)


def chromium_or_skip() -> str:
    """The Chromium binary on PATH, else the test is skipped. Tests never install it: `make browser` does
    (Debian's package, as root), and `make test` runs that target where PATCHSCOPE_INSTALL_BROWSER=1 (CI)."""
    binary = find_chromium()
    if binary is None:
        pytest.skip(f"headless Chromium not found (looked for {' or '.join(CHROMIUM)} on PATH); "
                    "`make browser` installs it (as root, with apt-get)")
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
