"""Curves of a `metrics.jsonl` log (training epochs, exaggeration or finetuning steps) rendered as one PNG.

Used by the run report (`analysis.report`); matplotlib Figure + Agg only, no pyplot state.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any, Sequence

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


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON object lines of a log and how many lines were skipped (torn, not JSON, not an object)."""
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
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
    dots = "o" if len(records) <= 40 else None
    for ax, (panel, keys) in zip(axes, series):
        for key in keys:
            ax.plot(xs, [_number(r.get(key)) for r in records], marker=dots, markersize=3, linewidth=1.5,
                    label=LABELS.get(key, key.replace("_", " ")))
        if mark is not None:
            ax.axvline(mark[0], color="0.4", linestyle=":", linewidth=1, label=mark[1])
        ax.set(title=panel, xlabel=axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    figure.suptitle(title)
    return render_figure(figure, "png", dpi=100, tight=False)
