"""Curves of a `metrics.jsonl` log (training epochs, exaggeration or finetuning steps) rendered as one PNG, and the
precision-recall curves of an evaluation's saved image scores.

Every curve of a panel gets its own colour, dash pattern and marker, so curves that lie on top of each other stay
visible; curves equal point for point are also named (`coinciding`), in the legend and in the report's text.
Used by the run report (`analysis.report`); matplotlib Figure + Agg only, no pyplot state.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from patchscope.common.userfiles import read_regular
from patchscope.forensics.figures import render_figure

Panel = tuple[str, tuple[str, ...]]  # (panel title, key patterns in fnmatch syntax)

TRAINING_PANELS: tuple[Panel, ...] = (
    ("loss", ("train_loss",)),
    ("patch accuracy", ("train_patch_acc", "val_patch_acc")),
    ("validation (image level)", ("val_ap", "val_acc")),
)
SHIFT_PANELS: tuple[Panel, ...] = (
    ("loss", ("loss", "fake_loss")),
    ("P(fake) of moved samples", ("p_fake",)),
    ("LPIPS to the original", ("lpips",)),
)
FINETUNE_PANELS: tuple[Panel, ...] = (
    ("losses", ("loss*",)),
    ("classifier on samples", ("acc", "acc_fake", "acc_real", "ap", "p_fake")),
    ("LPIPS to the original", ("lpips",)),
)
# Counters and timings: logged for bookkeeping, not for a curve.
BOOKKEEPING = {"epoch", "step", "images", "seconds", "images_per_s", "lr", "best_epoch", "epochs_since_best",
               "restored_step", "best_val_patch_acc"}
LABELS = {"train_loss": "train loss", "train_patch_acc": "train", "val_patch_acc": "validation",
          "val_ap": "val AP", "val_acc": "val accuracy", "fake_loss": "classifier term", "p_fake": "P(fake)",
          "acc": "accuracy", "acc_fake": "accuracy on fakes", "acc_real": "accuracy on reals", "ap": "AP"}
MAX_GENERIC_SERIES = 8
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")
DASHES = ("-", "--", "-.", ":", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_WIDTH = 34  # characters per legend line: a long test-set name wraps instead of widening the figure
MAX_SCORES_BYTES = 64 << 20  # a scores CSV is ~100 bytes per image: ~600k images; larger is left out


def curve_style(index: int) -> dict[str, Any]:
    """Colour, dash pattern and marker of the index-th curve of a panel: no two of the first 8 share any."""
    return {"color": COLOURS[index % len(COLOURS)], "linestyle": DASHES[index % len(DASHES)],
            "marker": MARKERS[index % len(MARKERS)]}


def coinciding(series: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> list[list[str]]:
    """Groups (two or more names, in the given order) of curves equal point for point (NaN equal to NaN)."""
    groups: list[list[str]] = []
    keys: list[tuple[np.ndarray, np.ndarray]] = []
    for name, (xs, ys) in series.items():
        x, y = np.asarray(xs, float), np.asarray(ys, float)
        for group, (gx, gy) in zip(groups, keys):
            if x.shape == gx.shape and y.shape == gy.shape and np.allclose(x, gx, equal_nan=True) \
                    and np.allclose(y, gy, equal_nan=True):
                group.append(name)
                break
        else:
            groups.append([name])
            keys.append((x, y))
    return [group for group in groups if len(group) > 1]


def coincide_text(groups: Sequence[Sequence[str]], what: str = "curves") -> str:
    """"curves A and B coincide (...)" for every group; empty when none."""
    if not groups:
        return ""
    names = "; ".join(", ".join(group[:-1]) + " and " + group[-1] for group in groups)
    return (f"{what.capitalize()} {names} coincide: equal at every point, drawn on top of each other "
            f"(told apart by dash pattern and marker).")


MAX_LOG_BYTES = 256 << 20  # a metrics log is a line per epoch or step; this is only a guard


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON object lines of a log and how many lines were skipped (torn, not JSON, not an object)."""
    records, skipped = [], 0
    data = read_regular(path, "a JSON-lines log", MAX_LOG_BYTES)  # regular files only, bounded: InputError
    for line in data.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a line of lists nested thousands deep
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range (10**400 in a hand-edited log): not plotted
            return math.nan
    return math.nan


def numeric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Keys holding a number in at least one record, in the order they first appear."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if not math.isnan(_number(value)):
                keys.setdefault(key, None)
    return list(keys)


def x_axis(records: Sequence[dict[str, Any]]) -> tuple[str, list[float]]:
    """(axis name, x per record): epochs, else steps, else the line number."""
    for key in ("epoch", "step"):
        if all(not math.isnan(_number(r.get(key))) for r in records):
            return key, [_number(r[key]) for r in records]
    return "record", [float(i + 1) for i in range(len(records))]


def choose_series(records: Sequence[dict[str, Any]], panels: Sequence[Panel]) -> list[tuple[str, list[str]]]:
    """(panel title, keys) for every panel with a logged key; when none has one, one panel of all logged values."""
    present = [k for k in numeric_keys(records) if k not in BOOKKEEPING]
    chosen = []
    for title, patterns in panels:
        keys = list(dict.fromkeys(k for p in patterns for k in present if fnmatch.fnmatchcase(k, p)))
        if keys:
            chosen.append((title, keys))
    if not chosen and present:
        chosen.append(("logged values", present[:MAX_GENERIC_SERIES]))
    return chosen


def plot_log(records: Sequence[dict[str, Any]], panels: Sequence[Panel], title: str,
             mark: tuple[float, str] | None = None) -> bytes | None:
    """PNG bytes of one figure, a panel per chosen group of keys against epoch/step; None when nothing to plot.

    `mark` = (x, label) draws a dotted vertical line on every panel (e.g. the best epoch).
    """
    from matplotlib.figure import Figure

    if not records:
        return None
    series = choose_series(records, panels)
    if not series:
        return None
    axis, xs = x_axis(records)
    figure = Figure(figsize=(4.3 * len(series), 3.3), layout="constrained")
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    for ax, (panel, keys) in zip(axes, series):
        values = {key: [_number(r.get(key)) for r in records] for key in keys}
        same = {name: group[0] for group in coinciding({k: (xs, v) for k, v in values.items()})
                for name in group[1:]}
        for index, (key, ys) in enumerate(values.items()):
            label = LABELS.get(key, key.replace("_", " "))
            if key in same:
                label += f" (= {LABELS.get(same[key], same[key].replace('_', ' '))})"
            ax.plot(xs, ys, markersize=4, linewidth=1.5, label=label, markevery=_mark_every(len(records), index),
                    **curve_style(index))
        if mark is not None:
            ax.axvline(mark[0], color="0.4", linestyle=":", linewidth=1, label=mark[1])
        ax.set(title=panel, xlabel=axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    figure.suptitle(title)
    return render_figure(figure, "png", dpi=100, tight=False)


def _mark_every(points: int, index: int) -> Any:
    """Every point of a short curve; on a long one about 10 markers, shifted per curve so equal curves show both."""
    if points <= 40:
        return None
    return (0.02 + 0.035 * (index % len(MARKERS)), 0.1)


# ----------------------------------------------------------------------------- precision-recall curves

def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of an evaluation's `scores_<test set>.csv` (path, label 0/1, score); ValueError when
    the file is not of that form (InputError, a ValueError, when it is not a regular file or too large)."""
    text = read_regular(path, "image scores (CSV)", MAX_SCORES_BYTES).decode("utf-8", errors="replace")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"label", "score"} <= set(rows[0]):
        raise ValueError(f"{path.name}: expected columns path, label, score")
    labels = np.array([int(row["label"]) for row in rows])
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path.name}: labels must be 0 (real) or 1 (fake)")
    return np.array([float(row["score"]) for row in rows]), labels


def pr_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(recall, precision, AP) with fake the positive class; None without both classes."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if labels.size == 0 or labels.min() == labels.max():
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    return recall, precision, float(average_precision_score(labels, scores))


def pr_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> tuple[Any, list[list[str]]]:
    """The precision-recall figure of (scores, labels) per test set, each curve its own style, the legend below
    the axes; and the groups of test sets whose curves coincide."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 6.2), layout="constrained")
    ax = figure.add_subplot()
    ax.set(xlabel="recall (fake positive)", ylabel="precision", xlim=(-0.01, 1.01), ylim=(0.0, 1.03), title=title)
    ax.grid(alpha=0.3)
    points = {name: pr_points(*pair) for name, pair in curves.items()}
    groups = coinciding({name: p[:2] for name, p in points.items() if p is not None})
    same = {name: group[0] for group in groups for name in group[1:]}
    for index, (name, found) in enumerate(points.items()):
        label = textwrap.fill(name, LEGEND_WIDTH, break_long_words=True)
        if found is None:
            ax.plot([], [], label=f"{label} (one class only, no curve)", **curve_style(index))
            continue
        recall, precision, ap = found
        extra = f", = {textwrap.shorten(same[name], LEGEND_WIDTH)}" if name in same else ""
        ax.plot(recall, precision, drawstyle="steps-post", linewidth=1.8, markersize=6,
                markevery=(0.02 + 0.045 * (index % len(MARKERS)), 0.12), label=f"{label} (AP {ap:.4f}{extra})",
                **curve_style(index))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="medium", ncols=1, frameon=False)
    return figure, groups


def plot_pr(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> tuple[bytes, list[list[str]]]:
    """PNG bytes of `pr_figure` and its coinciding groups."""
    figure, groups = pr_figure(curves, title)
    return render_figure(figure, "png", dpi=100, tight=False), groups
