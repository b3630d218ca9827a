"""Test-time robustness sweeps (Wang et al.): a classifier's AP and accuracy under JPEG and blur at several levels.

Used by `patchscope eval --perturb` and callable as `analysis.robustness.evaluate_robustness(...)`.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from patchscope.common.atomic import write_json, write_text
from patchscope.common.device import configure_backends, resolve_device, resolve_precision
from patchscope.common.errors import InputError
from patchscope.forensics import checkpoint, data
from patchscope.forensics.evaluate import EvalConfig, parse_test_spec, predict, scoring_view
from patchscope.forensics.figures import figure_format, save_figure
from patchscope.forensics.perturb import Perturbation, PerturbedImageSet, parse_perturbations
from patchscope.forensics.scoring import compute_metrics, image_scores

log = logging.getLogger("patchscope.robustness")

COLUMNS = ["perturbation", "level", "ap", "ap_real", "acc", "acc_real", "acc_fake", "n"]
CLEAN = "none"  # the `perturbation` of the unperturbed reference row
AXIS_LABELS = {"jpeg": "JPEG quality (lower = stronger)", "blur": "Gaussian blur sigma (px)"}
PANEL_TITLES = {"jpeg": "JPEG re-compression", "blur": "Gaussian blur"}


def _as_perturbations(perturbations: Sequence[Perturbation | str]) -> list[Perturbation]:
    """Perturbation objects and `KIND:LEVELS` specs, in the order given, as one list without repeats."""
    combined = [p for item in perturbations
                for p in ([item] if isinstance(item, Perturbation) else parse_perturbations([item]))]
    if not combined:
        raise InputError("no perturbation given (e.g. --perturb jpeg:95,75,50 --perturb blur:1,2)")
    names = [p.name for p in combined]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"perturbation {', '.join(repeated)} given more than once")
    return combined


def _score_level(model: torch.nn.Module, dataset: data.RealFakeDataset, batch_size: int, device: torch.device,
                 precision: str, workers: int, aggregation: str) -> dict[str, Any]:
    loader = data.make_loader(dataset, batch_size, train=False, workers=workers, device_type=device.type)
    logits, labels = predict(model, loader, device, precision, keep_logits=True)
    metrics = compute_metrics(image_scores(logits, aggregation), labels)
    return {key: metrics[key] for key in COLUMNS[2:]}


def evaluate_robustness(config: EvalConfig, real: str | os.PathLike, fake: str | os.PathLike,
                        perturbations: Sequence[Perturbation | str], out: str | os.PathLike) -> list[dict[str, Any]]:
    """Score the clean test set and every perturbation level; write robustness.csv/.json/.png into `out`.

    `config` says how to score, as for `patchscope eval`: run, which, split, aggregation, load/crop size
    (None: as the classifier was trained), view (`forensics.evaluate.view_crop_size`), batch size, device,
    precision, workers, on_bad_image, and force (replace an existing robustness.json); its tests, out,
    heatmaps and perturb are not read.
    Returns one row per level, the clean reference first (perturbation "none", level None):
    perturbation, level, ap, ap_real, acc, acc_real, acc_fake, n. Images are decoded and
    resized once (uint8 cache); each level perturbs them after that resize and before the
    view's crop, i.e. the image as the classifier would receive it.
    """
    levels = _as_perturbations(perturbations)
    run, split, aggregation, workers = config.run, config.split, config.aggregation, config.workers
    out = Path(out)
    if (out / "robustness.json").exists() and not config.force:
        raise InputError(f"{out}/robustness.json exists; pass --force to replace it or choose another --out")
    torch_device = resolve_device(config.device)
    precision = resolve_precision(config.precision, torch_device)
    configure_backends(torch_device)
    model, meta = checkpoint.load_classifier(run, config.which, torch_device)
    model = model.to(memory_format=torch.channels_last)
    sizes = scoring_view(model, meta, config.view, config.load_size, config.crop_size)
    real_set, fake_set = (data.ImageSet(data.list_images(source, split), load_size=sizes.load_size,
                                        min_size=sizes.min_size, on_bad_image=config.on_bad_image, cache=True,
                                        workers=workers)
                          for source in (real, fake))
    score = dict(batch_size=config.batch_size, device=torch_device, precision=precision, workers=workers,
                 aggregation=aggregation)

    clean = data.RealFakeDataset(real_set, fake_set, crop_size=sizes.input_crop, train=False)
    rows = [{"perturbation": CLEAN, "level": None, **_score_level(model, clean, **score)}]
    for perturbation in levels:
        dataset = data.RealFakeDataset(PerturbedImageSet(real_set, perturbation),
                                       PerturbedImageSet(fake_set, perturbation), crop_size=sizes.input_crop,
                                       train=False)
        level = float(perturbation.level)
        rows.append({"perturbation": perturbation.kind, "level": int(level) if level.is_integer() else level,
                     **_score_level(model, dataset, **score)})
    for row in rows:
        log.info("%s: AP %.4f, accuracy %.4f (real %.4f, fake %.4f), n=%d", _row_name(row), row["ap"],
                 row["acc"], row["acc_real"], row["acc_fake"], row["n"])

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "robustness.csv", _csv_text(rows))
    write_json(out / "robustness.json", {"run": str(run), "checkpoint_epoch": meta.get("epoch"),
                                         "model": meta.get("model"), "real": str(real), "fake": str(fake),
                                         "split": split, "aggregation": aggregation, "load_size": sizes.load_size,
                                         "crop_size": sizes.crop_size, "view": sizes.view,
                                         "input_size": sizes.input_crop, "rows": rows})
    plot_robustness(rows, out / "robustness.png", title=f"{meta.get('model')}: robustness ({aggregation})")
    return rows


def evaluate_robustness_tests(config: EvalConfig, perturbations: Sequence[Perturbation | str]) -> dict[str, Any]:
    """`evaluate_robustness` for every test set of an eval config, into `<out>/robustness/<name>/`.

    What `patchscope eval --perturb` runs beside the ordinary evaluation. Returns
    {"out": folder, "results": {test set name: rows}}.
    """
    levels = _as_perturbations(perturbations)
    specs = [parse_test_spec(spec) for spec in config.tests]
    if not specs:
        raise InputError("no test set given (--test NAME=REAL_DIR,FAKE_DIR)")
    run = Path(config.run)
    out = Path(config.out) if config.out else (run if run.is_dir() else run.parent) / "eval"
    results = {}
    for name, real, fake in specs:
        results[name] = evaluate_robustness(config, real, fake, levels, out / "robustness" / name)
    return {"out": str(out / "robustness"), "results": results}


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "level": "" if row["level"] is None else _level_text(row["level"])})
    return buffer.getvalue()


def _level_text(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else str(level)


def _row_name(row: dict[str, Any]) -> str:
    return "clean" if row["level"] is None else f"{row['perturbation']}:{_level_text(row['level'])}"


def format_robustness_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table, for the command line."""
    lines = [f"{'perturbation':<14} {'AP':>7} {'AP real':>8} {'acc':>7} {'acc real':>9} {'acc fake':>9} {'n':>6}"]
    for row in rows:
        lines.append(f"{_row_name(row):<14} {row['ap']:>7.4f} {row['ap_real']:>8.4f} {row['acc']:>7.4f} "
                     f"{row['acc_real']:>9.4f} {row['acc_fake']:>9.4f} {row['n']:>6}")
    return "\n".join(lines)


def plot_robustness(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> None:
    """AP and accuracies against level, one panel per perturbation kind; the clean values as dotted lines."""
    from matplotlib.figure import Figure

    path = Path(path)
    figure_format(path)
    clean = next((row for row in rows if row["level"] is None), None)
    kinds = list(dict.fromkeys(row["perturbation"] for row in rows if row["level"] is not None))
    if not kinds:
        raise ValueError("plot_robustness needs at least one perturbed row")
    figure = Figure(figsize=(5.5 * len(kinds), 4.5))
    series = [("ap", "AP", "-", "o"), ("acc", "accuracy", "-", "s"),
              ("acc_real", "accuracy on real", "--", "^"), ("acc_fake", "accuracy on fake", "--", "v")]
    for index, kind in enumerate(kinds):
        axes = figure.add_subplot(1, len(kinds), index + 1)
        chosen = sorted((row for row in rows if row["perturbation"] == kind), key=lambda row: row["level"])
        if kind == "blur" and clean is not None and chosen[0]["level"] != 0:
            chosen.insert(0, {**clean, "level": 0})  # sigma 0 is the identity: the curve starts at the clean score
        levels = [row["level"] for row in chosen]
        for key, label, style, marker in series:
            line, = axes.plot(levels, [row[key] for row in chosen], linestyle=style, marker=marker, label=label,
                              linewidth=2 if style == "-" else 1)
            if clean is not None and key in ("ap", "acc") and not math.isnan(clean[key]):
                axes.axhline(clean[key], color=line.get_color(), linestyle=":", linewidth=1,
                             label=f"clean {label} ({clean[key]:.3f})")
        if kind == "jpeg":
            axes.invert_xaxis()  # stronger compression to the right, like blur
        axes.set(title=PANEL_TITLES.get(kind, kind), xlabel=AXIS_LABELS.get(kind, "level"),
                 ylabel="AP / accuracy", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
