"""Rendering matplotlib figures without pyplot and writing them atomically.

Used by the PR/ROC curves here and by every figure of the analysis layer.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from patchscope.common.atomic import write_bytes
from patchscope.common.errors import InputError

FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(path: str | os.PathLike) -> str:
    """The file format a figure path asks for; anything but png/pdf/svg is a user error."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise InputError(f"{path}: expected a figure file name ending in .png, .pdf or .svg")
    return fmt


def render_figure(figure: Any, fmt: str = "png", dpi: int = 120, tight: bool = True) -> bytes:
    """The figure's bytes, drawn on a non-interactive Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return buffer.getvalue()


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 120, tight: bool = True) -> None:
    """Render by the path's suffix and write atomically."""
    write_bytes(path, render_figure(figure, figure_format(path), dpi, tight))
