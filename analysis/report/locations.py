"""Where the most predictive patches sit: shares in the image border and corners against what area alone would
give, and a heatmap of how many top patches each output position holds. Computed from `patches.json`.

Definitions (also printed on the page):
  * a patch's centre is the centre of its receptive field, `start + cell * jump` (pixel index; +0.5 in continuous
    coordinates, where the image spans [0, side]);
  * the band is one receptive field wide, capped at a quarter of the image's shorter side (on a 32 px image a 19 px
    band would hold every position, and the shares would say nothing);
  * border: the centre lies within the band of at least one edge; corner: within the band of a horizontal and a
    vertical edge;
  * expected from area: the share of all output positions that are border (corner) positions, i.e. the share if
    the chosen position were any position alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from patchscope.forensics.figures import render_figure

LABEL_ORDER = ("fake", "real")
MAX_SIDE = 100_000   # px: larger input sizes in a patches.json are not believed
MAX_CELLS = 1024     # output positions per axis (xception_block1 at 4096 px has 1024)
LABEL_OF = {0: "real", 1: "fake"}


@dataclass(frozen=True)
class Layout:
    """The geometry a patches run used: model input size, output grid, receptive field."""

    height: int
    width: int
    rows: int
    cols: int
    rf_size: int
    jump: float | None = None   # None: centres from the records' pixel boxes
    start: float | None = None

    @property
    def band(self) -> float:
        return min(float(self.rf_size), min(self.height, self.width) / 4)

    def centre(self, record: Mapping[str, Any]) -> tuple[float, float]:
        """(y, x) of a record's patch centre, continuous pixel coordinates."""
        if self.jump is not None and self.start is not None:
            return (self.start + int(record["row"]) * self.jump + 0.5,
                    self.start + int(record["col"]) * self.jump + 0.5)
        top, left, bottom, right = (float(v) for v in record["box"])
        return (top + bottom) / 2, (left + right) / 2

    def place(self, y: float, x: float) -> tuple[bool, bool]:
        """(border, corner) of a centre."""
        near_row = min(y, self.height - y) < self.band
        near_col = min(x, self.width - x) < self.band
        return near_row or near_col, near_row and near_col

    def expected(self) -> tuple[float, float]:
        """(border, corner) share of all output positions (needs jump and start)."""
        if self.jump is None or self.start is None:
            return float("nan"), float("nan")
        ys = self.start + np.arange(self.rows) * self.jump + 0.5
        xs = self.start + np.arange(self.cols) * self.jump + 0.5
        near_row = float(np.mean(np.minimum(ys, self.height - ys) < self.band))
        near_col = float(np.mean(np.minimum(xs, self.width - xs) < self.band))
        return 1 - (1 - near_row) * (1 - near_col), near_row * near_col


def layout_of(data: Mapping[str, Any]) -> Layout:
    """The layout of a patches.json; KeyError/TypeError/ValueError when it lacks the input size or positions.

    The output grid is `output_size` (written since it was added), else the model's (registered models), else the
    largest row and column any record names."""
    height, width = (int(v) for v in data["input_size"])
    rf = data.get("receptive_field") if isinstance(data.get("receptive_field"), dict) else {}
    grid = data.get("output_size")
    if not grid:
        try:
            from patchscope.forensics.receptive import patch_boxes
            grid = patch_boxes(str(data.get("model")), (height, width)).shape[:2]
        except Exception:  # an unknown model name: fall back to the records
            records = [*(data.get("top") or []), *(data.get("random") or [])]
            grid = (max(int(r["row"]) for r in records) + 1, max(int(r["col"]) for r in records) + 1)
    size = rf.get("size")
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE and 0 < int(grid[0]) <= MAX_CELLS
            and 0 < int(grid[1]) <= MAX_CELLS):
        raise ValueError(f"implausible geometry: input {height} x {width} px, {grid[0]} x {grid[1]} positions")
    return Layout(height=height, width=width, rows=int(grid[0]), cols=int(grid[1]),
                  rf_size=int(size) if size else min(height, width),
                  jump=float(rf["jump"]) if "jump" in rf else None, start=float(rf["start"]) if "start" in rf else None)


def shares(records: Sequence[Mapping[str, Any]], layout: Layout) -> dict[str, float]:
    """{"n", "border", "corner"}: how many records, and the share of them in the border and in a corner."""
    places = [layout.place(*layout.centre(r)) for r in records]
    if not places:
        return {"n": 0, "border": float("nan"), "corner": float("nan")}
    return {"n": len(places), "border": float(np.mean([b for b, _ in places])),
            "corner": float(np.mean([c for _, c in places]))}


def counts(records: Sequence[Mapping[str, Any]], layout: Layout) -> np.ndarray:
    """rows x cols: how many records chose each output position."""
    grid = np.zeros((layout.rows, layout.cols))
    for record in records:
        row, col = int(record["row"]), int(record["col"])
        if 0 <= row < layout.rows and 0 <= col < layout.cols:
            grid[row, col] += 1
    return grid


def by_label(records: Sequence[Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Records with a 0/1 label, grouped "fake" then "real" (labels present only)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if isinstance(record, dict) and record.get("label") in LABEL_OF:
            groups.setdefault(LABEL_OF[record["label"]], []).append(record)
    return {label: groups[label] for label in LABEL_ORDER if label in groups}


def percent(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    return f"{100 * value:.1f}%"


def location_rows(data: Mapping[str, Any], layout: Layout) -> list[dict[str, Any]]:
    """Table rows: per label, the most predictive and the random patches; then the expectation from area."""
    rows = []
    top, baseline = by_label(data.get("top") or []), by_label(data.get("random") or [])
    for label, records in top.items():
        grid = counts(records, layout)
        row, col = (int(v) for v in np.unravel_index(int(grid.argmax()), grid.shape))
        where = f"row {row}, col {col}"
        if layout.jump is not None and layout.start is not None:
            where += f" (centre y {layout.start + row * layout.jump:g}, x {layout.start + col * layout.jump:g} px)"
        rows.append({"patches": f"{label}: most predictive", **shares(records, layout),
                     "densest": f"{where}: {percent(grid.max() / max(grid.sum(), 1))}"})
        if label in baseline:
            rows.append({"patches": f"{label}: random", **shares(baseline[label], layout), "densest": ""})
    border, corner = layout.expected()
    rows.append({"patches": "expected from area", "n": layout.rows * layout.cols, "border": border,
                 "corner": corner, "densest": f"{percent(1 / (layout.rows * layout.cols))} at every position"})
    return rows


def definition_text(layout: Layout) -> str:
    capped = layout.band < layout.rf_size
    band = f"{layout.band:g} px" + (f" (a quarter of the {min(layout.height, layout.width)} px side; one receptive "
                                    f"field, {layout.rf_size} px, would cover the whole image)" if capped else
                                    " (one receptive field)")
    return (f"Border: the patch's centre (its receptive field's centre) lies within {band} of an image edge; "
            f"corner: within it of two edges, a horizontal and a vertical one. Expected from area: the share of all "
            f"{layout.rows} x {layout.cols} output positions that are border (corner) positions, as if the classifier "
            f"chose any position alike. Random: one uniformly drawn position per kept image, the same check "
            f"measured. Input {layout.height} x {layout.width} px.")


def location_figure(data: Mapping[str, Any], layout: Layout) -> bytes | None:
    """PNG: per label, the share of most predictive patches at each output position, placed over the image's
    pixel frame, the border band dashed; None without records."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    top = by_label(data.get("top") or [])
    if not top:
        return None
    maps = {label: counts(records, layout) / len(records) for label, records in top.items()}
    vmax = max(float(m.max()) for m in maps.values()) or 1.0
    norm, cmap = Normalize(0.0, vmax), colormaps["Reds"]  # no patch: white
    figure = Figure(figsize=(3.6 * len(maps) + 1.0, 3.9), layout="constrained")
    axes = figure.subplots(1, len(maps), squeeze=False)[0]
    for ax, (label, share) in zip(axes, maps.items()):
        if layout.jump is not None and layout.start is not None:
            half = layout.jump / 2
            extent = (layout.start + 0.5 - half, layout.start + 0.5 + (layout.cols - 1) * layout.jump + half,
                      layout.start + 0.5 + (layout.rows - 1) * layout.jump + half, layout.start + 0.5 - half)
        else:
            extent = (0, layout.width, layout.height, 0)
        ax.imshow(share, cmap=cmap, norm=norm, extent=extent, interpolation="nearest")
        band = layout.band
        ax.add_patch(Rectangle((band, band), layout.width - 2 * band, layout.height - 2 * band, fill=False,
                               edgecolor="#1f5fbf", linestyle="--", linewidth=1.6))
        ax.set(xlim=(0, layout.width), ylim=(layout.height, 0), xlabel="x (px)", ylabel="y (px)",
               title=f"{label}: {len(top[label])} most predictive patches")
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="share of the top patches",
                    shrink=0.9)
    figure.suptitle("Where the most predictive patches sit (dashed: inner edge of the border band)")
    return render_figure(figure, "png", dpi=100, tight=False)
