"""Patch logits -> patch probabilities, image scores, the patch loss, metrics, CSV tables and PR/ROC figures.

Pure functions used by training (loss, validation patch accuracy) and by evaluation and analysis (scores, metrics, plots).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from patchscope.common.atomic import write_text
from patchscope.common.errors import InputError
from patchscope.common.labels import FAKE, LABELS, fake_wins, p_fake, patch_targets
from patchscope.forensics.figures import figure_format, save_figure

AGGREGATIONS = ("after_softmax", "before_softmax", "vote")

# Column order of the results table; rows may leave any column out (written as an empty cell).
METRIC_COLUMNS = [
    "run",
    "test_set",
    "aggregation",
    "n",
    "n_real",
    "n_fake",
    "ap",
    "ap_real",
    "roc_auc",
    "acc",
    "acc_real",
    "acc_fake",
    "patch_ap",
    "patch_ap_real",
    "patch_acc",
]


def _as_patch_map(logits: torch.Tensor) -> torch.Tensor:
    """Return logits as N x 2 x H x W; a full-image classifier's N x 2 counts as a 1x1 map."""
    if logits.dim() == 2:
        logits = logits[:, :, None, None]
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"expected logits N x 2 x H x W (or N x 2), got shape {tuple(logits.shape)}")
    return logits


def patch_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """P(fake) of every patch, N x H x W, computed in float32."""
    return p_fake(_as_patch_map(logits).float())


def image_scores(logits: torch.Tensor, mode: str = "after_softmax") -> torch.Tensor:
    """One P(fake) score per image (N) from its patch logits, aggregated as `mode` (see AGGREGATIONS)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
    logits = _as_patch_map(logits).float()
    if mode == "after_softmax":
        return patch_probabilities(logits).mean(dim=(1, 2))
    if mode == "before_softmax":
        return p_fake(logits.mean(dim=(2, 3)))
    return fake_wins(logits).float().mean(dim=(1, 2))


def patch_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 1: cross entropy of every patch against its image's label, averaged over all patches."""
    logits = _as_patch_map(logits)
    n, _, h, w = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels for {n} logit maps, got shape {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), patch_targets(labels, h, w, device=logits.device))


def patch_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correctly classified patches, all patches) for validation patch accuracy; ties count as real."""
    logits = _as_patch_map(logits)
    n, _, h, w = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels for {n} logit maps, got shape {tuple(labels.shape)}")
    fake_label = (labels.to(device=logits.device) == FAKE)[:, None, None]
    correct = (fake_wins(logits) == fake_label).sum()
    return int(correct.item()), n * h * w


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_labels(labels: np.ndarray, what: str) -> None:
    if labels.size and not np.isin(labels, LABELS).all():
        raise ValueError(f"{what} must be 0 (real) or 1 (fake)")


def _ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(ap, ap_real, roc_auc); NaN when one class is missing, since none is defined without both."""
    if labels.size == 0 or labels.min() == labels.max():
        return math.nan, math.nan, math.nan
    ap = float(average_precision_score(labels, scores))
    ap_real = float(average_precision_score(1 - labels, 1 - scores))
    auc = float(roc_auc_score(labels, scores))
    return ap, ap_real, auc


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def compute_metrics(scores: Any, labels: Any, patch_probs: Any = None) -> dict[str, float | int]:
    """Metrics of one test set from image scores P(fake) and labels (fake = 1).

    Returns plain Python numbers: `ap` (fake positive), `ap_real` (real positive,
    the public code's convention), `roc_auc`, `acc` (fake iff score > 0.5),
    `acc_real`, `acc_fake`, `n_real`, `n_fake`, `n`; with `patch_probs`
    (N x H x W P(fake)) also `patch_ap` (fake positive), `patch_ap_real` (real
    positive: every patch scored 1 - P(fake)) and `patch_acc`, every patch
    labelled with its image's label. When only one class is present the ranking
    metrics (ap, ap_real, roc_auc, patch_ap, patch_ap_real) are NaN instead of
    sklearn's warning and degenerate value, and so is the accuracy of the missing class.
    """
    scores_np, labels_np = _to_numpy(scores).reshape(-1), _to_numpy(labels).reshape(-1)
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"{scores_np.size} scores but {labels_np.size} labels")
    _check_labels(labels_np, "labels")
    labels_np = labels_np.astype(np.int64)

    is_fake = labels_np == FAKE
    correct = (scores_np > 0.5) == is_fake
    ap, ap_real, auc = _ranking_metrics(scores_np, labels_np)
    metrics: dict[str, float | int] = {
        "n": int(labels_np.size),
        "n_real": int((~is_fake).sum()),
        "n_fake": int(is_fake.sum()),
        "ap": ap,
        "ap_real": ap_real,
        "roc_auc": auc,
        "acc": _mean_or_nan(correct),
        "acc_real": _mean_or_nan(correct[~is_fake]),
        "acc_fake": _mean_or_nan(correct[is_fake]),
    }
    if patch_probs is not None:
        probs = _to_numpy(patch_probs)
        if probs.ndim != 3 or probs.shape[0] != labels_np.size:
            raise ValueError(f"expected patch_probs N x H x W with N = {labels_np.size}, got shape {probs.shape}")
        patch_labels = np.broadcast_to(labels_np[:, None, None], probs.shape).reshape(-1)
        probs = probs.reshape(-1)
        metrics["patch_ap"], metrics["patch_ap_real"], _ = _ranking_metrics(probs, patch_labels)
        metrics["patch_acc"] = _mean_or_nan((probs > 0.5) == (patch_labels == FAKE))
    return metrics


def _read_header(text: str) -> list[str] | None:
    """The column names on the table's first line, or None for an empty file."""
    if not text.strip():
        return None
    return next(csv.reader([text.splitlines()[0]]), [])


def append_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
               columns: Sequence[str] = METRIC_COLUMNS) -> None:
    """Append `rows` to the CSV table at `path` (header written when the file is new), atomically.

    A row may leave columns out (empty cell); a key outside `columns` is a ValueError.
    An existing table an older patchscope wrote (its header: some of `columns`, in their order) is rewritten under
    `columns`, its rows keeping their values and leaving the new columns empty; an existing file with any other
    header is an InputError naming the file.
    """
    path = Path(path)
    columns = list(columns)
    for row in rows:
        unknown = [key for key in row if key not in columns]
        if unknown:
            raise ValueError(f"row has columns not in the table: {', '.join(unknown)}")

    try:
        existing = path.read_text() if path.exists() else ""
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the existing results table ({err})") from err
    header = _read_header(existing)
    if header is not None and header != columns and _is_older_header(header, columns):
        existing, header = _upgraded_table(existing, columns), columns
    if header is not None and header != columns:
        raise InputError(f"{path}: existing CSV header {','.join(header)} differs from the expected "
                         f"{','.join(columns)}; write to a new file")
    if existing and not existing.endswith("\n"):
        existing += "\n"

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if header is None:
        existing = ""
        writer.writeheader()
    writer.writerows(rows)
    # Rewrite the whole file under a temporary name so a crash never leaves half a row.
    write_text(path, existing + buffer.getvalue())


def _is_older_header(header: list[str], columns: list[str]) -> bool:
    """Whether `header` is `columns` less some of them, in the same order: an older version of the table."""
    return bool(header) and len(set(header)) == len(header) and set(header) <= set(columns) and \
        sorted(header, key=columns.index) == header


def _upgraded_table(text: str, columns: list[str]) -> str:
    """An older table's text under the header `columns`: every row's values kept, the new columns empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    # A ragged row's surplus cells (DictReader's None key) are no column of the table: dropped.
    writer.writerows({k: v for k, v in row.items() if k in columns} for row in csv.DictReader(io.StringIO(text)))
    return buffer.getvalue()


def _new_axes(title: str | None, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title)
    return figure, axes


def _curve_inputs(name: str, scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores, labels, both classes present) for one test set."""
    scores_np, labels_np = _to_numpy(scores).reshape(-1), _to_numpy(labels).reshape(-1)
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"{name}: {scores_np.size} scores but {labels_np.size} labels")
    _check_labels(labels_np, f"{name}: labels")
    labels_np = labels_np.astype(np.int64)
    return scores_np, labels_np, bool(labels_np.size and labels_np.min() != labels_np.max())


def plot_pr_curves(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """Save one precision-recall figure (fake positive), one line per test set labelled with its AP."""
    if not curves:
        raise ValueError("plot_pr_curves needs at least one (scores, labels) pair")
    path = Path(path)
    figure_format(path)
    figure, axes = _new_axes(title, "recall", "precision")
    for name, (scores, labels) in curves.items():
        scores_np, labels_np, both = _curve_inputs(name, scores, labels)
        if not both:
            axes.plot([], [], label=f"{name} (one class only, no curve)")
            continue
        precision, recall, _ = precision_recall_curve(labels_np, scores_np)
        ap = average_precision_score(labels_np, scores_np)
        axes.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {100 * ap:.1f})")
    axes.legend(loc="lower left", fontsize="small")
    save_figure(figure, path)


def plot_roc_curves(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """Save one ROC figure (fake positive), one line per test set labelled with its AUC."""
    if not curves:
        raise ValueError("plot_roc_curves needs at least one (scores, labels) pair")
    path = Path(path)
    figure_format(path)
    figure, axes = _new_axes(title, "false positive rate", "true positive rate")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    for name, (scores, labels) in curves.items():
        scores_np, labels_np, both = _curve_inputs(name, scores, labels)
        if not both:
            axes.plot([], [], label=f"{name} (one class only, no curve)")
            continue
        fpr, tpr, _ = roc_curve(labels_np, scores_np)
        auc = roc_auc_score(labels_np, scores_np)
        axes.plot(fpr, tpr, label=f"{name} (AUC {100 * auc:.1f})")
    axes.legend(loc="lower right", fontsize="small")
    save_figure(figure, path)
