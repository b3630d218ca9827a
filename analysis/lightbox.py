"""A self-contained HTML page of captioned image thumbnails that open large on click (a lightbox).

Used by the heatmap and patch pages; every file name and text is escaped, every link URL-quoted.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Sequence
from urllib.parse import quote

from patchscope.common.atomic import write_text


@dataclass(frozen=True)
class LightboxItem:
    """One thumbnail: `image` is a path relative to the page; `caption` is plain text ("\\n" = new line)."""

    image: str | PurePath
    caption: str = ""


def image_url(path: str | PurePath) -> str:
    """A relative (or absolute) file path as a URL: every character that means something in a URL is quoted."""
    return quote(PurePath(path).as_posix(), safe="/")


def _caption_html(text: str) -> str:
    return "<br>".join(html.escape(line) for line in text.split("\n"))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.note { color: #555; max-width: 60em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 6px; cursor: zoom-in; }
figure img { width: 100%; image-rendering: pixelated; display: block; }
figcaption { font-size: 0.85em; margin-top: 4px; overflow-wrap: anywhere; }
#box { display: none; position: fixed; inset: 0; background: rgba(0, 0, 0, 0.88); cursor: zoom-out;
       flex-direction: column; align-items: center; justify-content: center; }
#box.open { display: flex; }
#box img { max-width: 94vw; max-height: 84vh; image-rendering: pixelated; background: #fff; }
#box p { color: #eee; margin: 0.6em; text-align: center; white-space: pre-line; }
"""

# Captions reach the large view through textContent, never as HTML.
_SCRIPT = """
const figures = Array.from(document.querySelectorAll("figure[data-full]"));
const box = document.getElementById("box"), big = box.querySelector("img"), text = box.querySelector("p");
let current = -1;
function show(i) {
  current = (i + figures.length) % figures.length;
  const f = figures[current];
  big.src = f.dataset.full;
  text.textContent = f.dataset.caption;
  box.classList.add("open");
}
figures.forEach((f, i) => f.addEventListener("click", () => show(i)));
box.addEventListener("click", () => box.classList.remove("open"));
document.addEventListener("keydown", (e) => {
  if (!box.classList.contains("open")) return;
  if (e.key === "Escape") box.classList.remove("open");
  if (e.key === "ArrowRight") show(current + 1);
  if (e.key === "ArrowLeft") show(current - 1);
});
"""


def render_lightbox(sections: Sequence[tuple[str, Sequence[LightboxItem]]], title: str,
                    note: str | None = None) -> str:
    """The page as a string: a heading per section, then its thumbnails; an empty section says so."""
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{_caption_html(note)}</p>')
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if not items:
            parts.append('<p class="note">(none)</p>')
            continue
        parts.append('<div class="grid">')
        for item in items:
            url = html.escape(image_url(item.image))
            caption = html.escape(item.caption)
            alt = html.escape(item.caption.split("\n")[0] or PurePath(item.image).name)
            parts.append(f'<figure data-full="{url}" data-caption="{caption}">'
                         f'<img src="{url}" alt="{alt}" loading="lazy">'
                         f"<figcaption>{_caption_html(item.caption)}</figcaption></figure>")
        parts.append("</div>")
    parts += ['<div id="box"><img alt=""><p></p></div>', f"<script>{_SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_lightbox(path: str | os.PathLike, sections: Sequence[tuple[str, Sequence[LightboxItem]]],
                   title: str, note: str | None = None) -> Path:
    """Write `render_lightbox(...)` to `path` atomically; image paths are relative to the page's folder."""
    path = Path(path)
    write_text(path, render_lightbox(sections, title, note))
    return path
