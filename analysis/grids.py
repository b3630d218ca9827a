"""Labelled image grids rendered with Pillow: the one renderer behind every comparison figure.

Used for exaggeration rows G(z − k·w) (k > 0 more fake; see attacks.shift.SIGN_CONVENTION),
original-vs-finetuned sheets, sample sheets and heatmap cards.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from patchscope.common.atomic import write_bytes
from patchscope.common.errors import InputError

GAP = 4             # px between tiles and around the tile block; a highlight frame lives in it
PAD = 6             # px around every text band
LABEL_FONT = 15     # px; labels, captions, colour-bar ticks
TITLE_FONT = 19     # px
MIN_TILE = 128      # default: small images are enlarged (whole factors, nearest) to at least this side
MAX_TITLE_WIDTH = 1200  # px; a longer title is cut with an ellipsis rather than widening the page more
BAR_WIDTH = 18      # px of the colour bar itself
HIGHLIGHT = (220, 30, 30)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass(frozen=True)
class ColourBar:
    """A vertical colour scale drawn right of the tiles (e.g. the P(fake) range of heatmaps)."""

    cmap: str = "jet"
    vmin: float = 0.0
    vmax: float = 1.0
    label: str = "P(fake)"
    ticks: int = 5  # labelled values, evenly spaced from vmin to vmax


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: margins, tile size and pitch. `tile_origin` gives each tile's corner."""

    rows: int
    cols: int
    tile_height: int
    tile_width: int
    left: int      # row-label margin
    top: int       # title + column-label bands
    caption: int   # caption band under every tile
    right: int     # colour-bar margin
    width: int
    height: int

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of tile (row, col)."""
        x = self.left + GAP + col * (self.tile_width + GAP)
        y = self.top + GAP + row * (self.tile_height + self.caption + GAP)
        return x, y


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only a small fixed bitmap font
        font = None
    if not isinstance(font, ImageFont.FreeTypeFont):
        # The fixed bitmap font is unreadable at figure scale and cannot be anchored.
        raise RuntimeError("analysis.grids needs Pillow >= 10.1 built with FreeType for its text")
    return font


def _text_width(text: str, font: ImageFont.ImageFont) -> int:
    return math.ceil(font.getlength(text)) if text else 0


def _line_height(font: ImageFont.ImageFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _ellipsize(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text` cut to fit `width` px, ending in an ellipsis when it was cut."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] images (C x H x W or N x C x H x W, the project's tensor layout) -> uint8 H x W x 3 (N x ...)."""
    array = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim not in (3, 4) or array.shape[-3] != 3:
        raise ValueError(f"expected 3 x H x W or N x 3 x H x W images in [-1, 1], got shape {array.shape}")
    pixels = np.clip(np.rint((array.astype(np.float64) + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))


def _tile_array(tile: Any, row: int, col: int) -> np.ndarray | None:
    if tile is None:
        return None
    array = tile.detach().cpu().numpy() if isinstance(tile, torch.Tensor) else np.asarray(tile)
    if array.dtype != np.uint8:
        raise ValueError(f"tile ({row}, {col}) is {array.dtype}; expected uint8 H x W x 3 "
                         "(convert [-1, 1] tensors with analysis.grids.to_uint8)")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"tile ({row}, {col}) has shape {array.shape}; expected H x W x 3")
    return array


def _as_tiles(images: Any) -> list[list[np.ndarray | None]]:
    """Rows of H x W x 3 uint8 tiles (None = blank) from a 5-d array/tensor or nested lists."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 5:
            raise ValueError(f"expected images as R x C x H x W x 3, got shape {tuple(images.shape)}")
        images = [list(row) for row in images]
    if not isinstance(images, Sequence) or not images:
        raise ValueError("expected at least one row of images (R x C x H x W x 3 or a list of rows)")
    rows = []
    for r, row in enumerate(images):
        if isinstance(row, (np.ndarray, torch.Tensor)) and row.ndim == 3:
            raise ValueError(f"row {r} is a single image; wrap rows in a list ([[img, ...], ...])")
        rows.append([_tile_array(tile, r, c) for c, tile in enumerate(row)])
    cols = len(rows[0])
    if cols == 0:
        raise ValueError("expected at least one image per row")
    for r, row in enumerate(rows):
        if len(row) != cols:
            raise ValueError(f"row {r} has {len(row)} images but row 0 has {cols}; rows must be equally long")
    shapes = {tile.shape for row in rows for tile in row if tile is not None}
    if not shapes:
        raise ValueError("every tile is blank (None)")
    if len(shapes) > 1:
        raise ValueError(f"tiles differ in size ({', '.join(f'{h}x{w}' for h, w, _ in sorted(shapes))}); "
                         "resize them to one size first")
    return rows


def _check_labels(labels: Sequence[str] | None, count: int, what: str) -> None:
    if labels is not None and len(labels) != count:
        raise ValueError(f"{len(labels)} {what} labels for {count} {what}s")


def _check_captions(captions: Sequence[Sequence[str | None]] | None, rows: int, cols: int) -> None:
    if captions is None:
        return
    if len(captions) != rows or any(len(row) != cols for row in captions):
        raise ValueError(f"captions must be {rows} rows of {cols} strings (None for none), like the images")


def _tile_size(height: int, width: int, tile_size: int | None) -> tuple[int, int]:
    if tile_size is None:
        factor = max(1, math.ceil(MIN_TILE / max(height, width)))
        return height * factor, width * factor
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    scale = tile_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _colour_bar_margin(bar: ColourBar | None) -> int:
    if bar is None:
        return 0
    font = _font(LABEL_FONT)
    ticks = max(_text_width(_tick_text(v), font) for v in _tick_values(bar))
    return max(PAD + BAR_WIDTH + PAD + ticks, _text_width(bar.label, font)) + 2 * PAD


def grid_layout(rows: int, cols: int, tile_height: int, tile_width: int,
                row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                captions: Sequence[Sequence[str | None]] | None = None, title: str | None = None,
                colour_bar: ColourBar | None = None) -> GridLayout:
    """Where everything goes; `image_grid` draws exactly this layout."""
    font, title_font = _font(LABEL_FONT), _font(TITLE_FONT)
    line = _line_height(font)
    left = 0
    if row_labels:
        widest = max(_text_width(part, font) for label in row_labels for part in str(label).split("\n"))
        left = min(widest, max(2 * tile_width, 240)) + 2 * PAD
    top = (_line_height(title_font) + 2 * PAD if title else 0) + (line + 2 * PAD if col_labels else 0)
    caption = 0
    if captions is not None:
        lines = max((len(str(text).split("\n")) for row in captions for text in row if text), default=0)
        caption = lines * line + PAD if lines else 0
    right = _colour_bar_margin(colour_bar)
    width = left + GAP + cols * (tile_width + GAP) + right
    if title:
        width = max(width, min(_text_width(title, title_font), MAX_TITLE_WIDTH) + 2 * PAD)
    if colour_bar is not None:
        top = max(top, line + PAD)  # room for the bar's label above the first tile row
    height = top + GAP + rows * (tile_height + caption + GAP)
    return GridLayout(rows, cols, tile_height, tile_width, left, top, caption, right, width, height)


def _tick_values(bar: ColourBar) -> np.ndarray:
    return np.linspace(bar.vmin, bar.vmax, max(2, bar.ticks))


def _tick_text(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.1f}"


def colour_lut(cmap: str) -> np.ndarray:
    """256 x 3 uint8 colours of a matplotlib colour map, for fast indexed colouring."""
    from matplotlib import colormaps

    try:
        colours = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]
    except KeyError:
        raise ValueError(f"unknown colour map {cmap!r}") from None
    return np.rint(colours * 255).astype(np.uint8)


def _draw_colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, layout: GridLayout, bar: ColourBar) -> None:
    font = _font(LABEL_FONT)
    x0 = layout.tile_origin(0, layout.cols)[0] + PAD  # just right of the last column
    y0 = layout.top + GAP
    height = layout.height - y0 - GAP - layout.caption
    # Top of the bar is vmax, so the scale reads like a y axis.
    ramp = colour_lut(bar.cmap)[np.linspace(255, 0, height).round().astype(int)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None], BAR_WIDTH, axis=1))), (x0, y0))
    draw.rectangle([x0 - 1, y0 - 1, x0 + BAR_WIDTH, y0 + height], outline=INK)
    draw.text((x0, y0 - PAD), bar.label, fill=INK, font=font, anchor="ls")
    span = bar.vmax - bar.vmin or 1.0
    for value in _tick_values(bar):
        y = y0 + round((bar.vmax - value) / span * (height - 1))
        draw.line([x0 + BAR_WIDTH, y, x0 + BAR_WIDTH + 3, y], fill=INK)
        draw.text((x0 + BAR_WIDTH + PAD, y), _tick_text(value), fill=INK, font=font, anchor="lm")


def _resize(tile: np.ndarray, height: int, width: int) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(tile))
    if image.size == (width, height):
        return image
    # Enlarging keeps pixels sharp (the artefacts are the point); shrinking needs a proper filter.
    upscale = height >= tile.shape[0] and width >= tile.shape[1]
    return image.resize((width, height), Image.NEAREST if upscale else Image.LANCZOS)


def image_grid(images: Any, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               captions: Sequence[Sequence[str | None]] | None = None, title: str | None = None,
               tile_size: int | None = None, highlight_col: int | None = None,
               colour_bar: ColourBar | None = None) -> Image.Image:
    """Render R x C uint8 images as one labelled RGB grid.

    `images`: uint8 R x C x H x W x 3 (array or tensor) or rows of H x W x 3 images (None = blank tile).
    `captions`: R rows of C strings (None for none; "\\n" for several lines) under each tile.
    `tile_size`: the longer tile side in px; by default small images are enlarged by a whole
    factor (nearest) to at least MIN_TILE px. `highlight_col`: framed column (e.g. the original, k = 0).
    """
    tiles = _as_tiles(images)
    rows, cols = len(tiles), len(tiles[0])
    _check_labels(row_labels, rows, "row")
    _check_labels(col_labels, cols, "column")
    _check_captions(captions, rows, cols)
    if highlight_col is not None and not -cols <= highlight_col < cols:
        raise ValueError(f"highlight_col {highlight_col} is outside the {cols} columns")
    source_h, source_w = next(t.shape[:2] for row in tiles for t in row if t is not None)
    tile_h, tile_w = _tile_size(source_h, source_w, tile_size)
    layout = grid_layout(rows, cols, tile_h, tile_w, row_labels, col_labels, captions, title, colour_bar)

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(LABEL_FONT), _font(TITLE_FONT)
    line = _line_height(font)
    if title:
        draw.text((PAD, PAD), _ellipsize(title, title_font, layout.width - 2 * PAD), fill=INK, font=title_font)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            x, y = layout.tile_origin(r, c)
            if tile is not None:
                canvas.paste(_resize(tile, tile_h, tile_w), (x, y))
            for k, text in enumerate(str(captions[r][c]).split("\n") if captions and captions[r][c] else []):
                draw.text((x + tile_w // 2, y + tile_h + PAD // 2 + k * line),
                          _ellipsize(text, font, tile_w), fill=INK, font=font, anchor="ma")
    if col_labels:
        for c, label in enumerate(col_labels):
            x, y = layout.tile_origin(0, c)
            draw.text((x + tile_w // 2, layout.top - PAD), _ellipsize(str(label), font, tile_w + GAP),
                      fill=INK, font=font, anchor="md")
    if row_labels:
        for r, label in enumerate(row_labels):
            x, y = layout.tile_origin(r, 0)
            parts = [_ellipsize(part, font, layout.left - 2 * PAD) for part in str(label).split("\n")]
            first = y + tile_h // 2 - (len(parts) - 1) * line // 2
            for k, part in enumerate(parts):
                draw.text((layout.left - PAD, first + k * line), part, fill=INK, font=font, anchor="rm")
    if highlight_col is not None:
        for r in range(rows):
            x, y = layout.tile_origin(r, highlight_col % cols)
            draw.rectangle([x - GAP + 1, y - GAP + 1, x + tile_w + GAP - 2, y + tile_h + GAP - 2],
                           outline=HIGHLIGHT, width=GAP - 1)
    if colour_bar is not None:
        _draw_colour_bar(canvas, draw, layout, colour_bar)
    return canvas


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def save_image(path: str | os.PathLike, image: Image.Image) -> Path:
    """Write a rendered image as PNG, atomically; `path` must end in .png."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: expected a file name ending in .png")
    write_bytes(path, encode_png(image))
    return path


def save_grid(path: str | os.PathLike, images: Any, **options: Any) -> Image.Image:
    """`image_grid(images, **options)` written to `path` (.png, atomically); returns the image."""
    image = image_grid(images, **options)
    save_image(path, image)
    return image
