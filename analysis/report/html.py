"""HTML pieces of the run report: escaped text, number formatting, tables, embedded images, the page frame.

Used by `analysis.report` and its section builders; every text that reaches the page passes `html.escape` here.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from patchscope.analysis.report.glossary import tip
from patchscope.common.userfiles import read_regular

MAX_SIDE = 1600                  # px; larger images are shrunk before embedding
MAX_IMAGE_BYTES = 3 * 2**20      # one embedded image above this is re-encoded (shrunk PNG, else JPEG)
MAX_FILE_BYTES = 256 * 2**20     # an image file larger than this is left out unread (a sparse multi-GiB file)
MAX_TOTAL_BYTES = 48 * 2**20     # all embedded images of one page together
JPEG_QUALITY = 88
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def format_value(value: Any) -> str:
    """A number as a table shows it: 4 decimals (1 from 100 up), 3 significant digits when tiny or huge, NaN "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def format_short(value: Any) -> str:
    """A setting such as k or a perturbation level: as few digits as it needs."""
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:g}"
    return format_value(value)


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its header, and how a value is written. A `name` column holds
    free text such as a test set's name: it wraps within a bounded width, the full text in its title."""

    key: str
    header: str
    fmt: Callable[[Any], str] = format_value
    name: bool = False


def cell(column: Column, value: Any) -> str:
    text = escape(column.fmt(value))
    return f'<td class="name" title="{text}">{text}</td>' if column.name else f"<td>{text}</td>"


def table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]],
          highlight: Callable[[Mapping[str, Any]], bool] | None = None) -> str:
    """An HTML table; a missing value shows as "n/a"; rows `highlight` picks are set in bold; a header naming a
    term of the glossary carries its definition as a tooltip."""
    head = "".join(f"<th{tip(c.header)}>{escape(c.header)}</th>" for c in columns)
    body = []
    for row in rows:
        cls = ' class="chosen"' if highlight is not None and highlight(row) else ""
        cells = "".join(cell(c, row.get(c.key)) for c in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_values(pairs: Sequence[tuple[str, Any]], fmt: Callable[[Any], str] = format_value) -> str:
    """A two-column table of labelled values (plain text or numbers, the latter written by `fmt`)."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def paragraph(text: str, cls: str = "caption") -> str:
    return f'<p class="{cls}">{escape(text)}</p>'


def preformatted(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def details(summary: str, body_html: str, open_: bool = False) -> str:
    """A folded block (no script needed: the browser's own <details>)."""
    return f"<details{' open' if open_ else ''}><summary>{escape(summary)}</summary>{body_html}</details>"


def heading(level: int, text: str) -> str:
    return f"<h{level}>{escape(text)}</h{level}>"


class ImageSkipped(Exception):
    """An image the page leaves out; the message says why."""


@dataclass
class ImageEmbedder:
    """Turns image files into data URIs, shrinking large ones, within one page-wide byte budget."""

    max_side: int = MAX_SIDE
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES
    used_bytes: int = 0
    count: int = 0

    def file(self, path: Path) -> str:
        """The data URI of an image file; ImageSkipped when it is unreadable or the budget is spent."""
        try:
            raw = read_regular(path, "an image", MAX_FILE_BYTES)  # InputError (a ValueError) past the bound
            with Image.open(io.BytesIO(raw)) as image:
                image.load()
                if image.format in MIME and max(image.size) <= self.max_side and len(raw) <= self.max_image_bytes:
                    data, mime = raw, MIME[image.format]
                else:
                    data, mime = self._shrunk(image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ImageSkipped(f"unreadable image ({type(err).__name__})") from None
        return self.data(data, mime)

    def data(self, data: bytes, mime: str) -> str:
        if self.used_bytes + len(data) > self.max_total_bytes:
            raise ImageSkipped(f"the page already embeds {self.max_total_bytes // 2**20} MiB of images")
        self.used_bytes += len(data)
        self.count += 1
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

    def _shrunk(self, image: Image.Image) -> tuple[bytes, str]:
        """PNG at most max_side px; JPEG when even that PNG is too large (photographic content)."""
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.thumbnail((self.max_side, self.max_side), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= self.max_image_bytes:
            return buffer.getvalue(), MIME["PNG"]
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue(), MIME["JPEG"]


def figure(uri: str, caption: str, alt: str, pixels: bool = False, wide: bool = False) -> str:
    """An embedded image with its caption; `pixels` keeps small images sharp when enlarged (grids, cards);
    `wide` gives it the page's whole width."""
    cls = ' class="pixels"' if pixels else ""
    outer = ' class="wide"' if wide else ""
    return (f'<figure{outer}><img{cls} src="{uri}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1.5em 2em 4em; color: #1d1d1f; background: #fbfbfd; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2.2em; padding-top: 0.6em; border-top: 2px solid #d0d4dc; overflow-wrap: anywhere; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; color: #333; }
.where { color: #555; font-size: 0.9em; overflow-wrap: anywhere; }
.caption { color: #333; max-width: 70em; }
.terms { color: #333; font-size: 0.92em; max-width: 75em; background: #f2f4f8; padding: 0.35em 0.7em;
         border-left: 3px solid #9fb3d1; }
.note { color: #8a4b00; background: #fff4e0; border-left: 3px solid #e0a040; padding: 0.3em 0.7em; }
nav ol { columns: 2; column-gap: 2.5em; padding-left: 1.8em; }
nav li { break-inside: avoid; overflow-wrap: anywhere; } nav a { color: #1f5fbf; text-decoration: none; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.9em; background: #fff; }
th, td { border: 1px solid #d6d9e0; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef1f6; } td:first-child, th:first-child { text-align: left; }
table.kv th { text-align: left; font-weight: 600; } table.kv td { text-align: left; overflow-wrap: anywhere; }
tr.chosen td { font-weight: 600; }
td.name { text-align: left; max-width: 18em; overflow-wrap: anywhere; }
th[title] { text-decoration: underline dotted #889; cursor: help; }
table.summary td, table.summary th { text-align: left; } table.summary td.num { text-align: right; }
table.summary a { color: #1f5fbf; text-decoration: none; }
figure { margin: 0.6em 0 1.2em; background: #fff; border: 1px solid #e0e3ea; padding: 8px; display: inline-block;
         max-width: calc(100% - 18px); vertical-align: top; }
figure img { max-width: 100%; height: auto; display: block; }
figure.wide { display: block; max-width: none; } figure.wide img { width: min(100%, 1100px); }
img.pixels { image-rendering: pixelated; }
figcaption { font-size: 0.95em; color: #2a2a2e; margin-top: 6px; max-width: 60em; overflow-wrap: anywhere;
             line-height: 1.4; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 12px; }
.cards figure { margin: 0; max-width: none; }
pre { background: #f2f3f7; border: 1px solid #e0e3ea; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.4em 0 1em; } summary { cursor: pointer; color: #1f5fbf; }
"""


def page(title: str, subtitle: str, toc: Sequence[tuple[str, str]], body: Sequence[str]) -> str:
    """The whole document: inline style, a linked table of contents (anchors within the page), the body."""
    items = "".join(f'<li><a href="#{escape(anchor)}">{escape(text)}</a></li>' for anchor, text in toc)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             heading(1, title), paragraph(subtitle, "where"),
             f"<nav>{heading(3, 'Contents')}<ol>{items}</ol></nav>", *body, "</body>", "</html>"]
    return "\n".join(parts) + "\n"
