"""The retrain study: what stays detectable after finetuning — old vs retrained classifier, metrics and the
semantic classes of their most predictive patches side by side (one table, one figure, a summary). Used by the CLI.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from patchscope.analysis.patches import make_segmenter, run_patches
from patchscope.analysis.segment import Segmenter, class_histogram, save_figure
from patchscope.attacks.retrain import (CLASSIFIERS, TEST_SETS, TEST_SPLIT, RetrainConfig, RetrainResult, record_stage,
                                       retrain, stage_is_current)
from patchscope.common import distributed
from patchscope.common.atomic import write_json, write_text
from patchscope.common.checks import check_choice, check_counts, check_int, check_text, require
from patchscope.common.device import PRECISIONS, resolve_device
from patchscope.common.runfolder import RunFolder
from patchscope.forensics.checkpoint import CHECKPOINT_CHOICES
from patchscope.forensics.data import BAD_IMAGE_POLICIES
from patchscope.forensics.scoring import AGGREGATIONS
from patchscope.generators import checkpoint_sha256

log = logging.getLogger("patchscope.residual")

LABELS = ("fake", "real")
WHO = {"old": "old classifier", "new": "retrained classifier", "random": "random patch"}
COLORS = {"old": "tab:blue", "new": "tab:orange", "random": "tab:gray"}
SET_NAMES = {"original": "original fakes", "finetuned": "finetuned fakes"}
# Settings a resumed study may change: where and how fast it runs, never what it computes.
RESUMABLE_CHANGES = ("out", "device", "workers", "sample_batch_size", "batch_size")
RUN_FOLDER = RunFolder(holds="a retrain study", resumable=RESUMABLE_CHANGES, force_to="redo it",
                       writes=("retrain", "patches", "comparison.json", "comparison.csv", "comparison.png",
                               "summary.txt"))


@dataclass
class RetrainStudyConfig:
    classifier: str = ""                # the old classifier: run directory or .safetensors file
    generator: str = ""                 # the finetuned generator checkpoint (any format load_generator reads), or
    #                                     MODULE:CALLABLE with weights = its finetuned generator.safetensors
    weights: str = ""
    latent_dim: int | None = None       # MODULE:CALLABLE without latent_dim / resolution attributes
    resolution: int | None = None
    out: str = ""                       # study folder: retrain/, patches/{old,new}/, comparison.*, summary.txt
    real: str | None = None             # reals (None: the old classifier's training reals)
    original_fakes: str | None = None   # the original generator's fakes (None: the old classifier's training fakes)
    counts: dict[str, int] | None = None  # finetuned fakes per split (None: as many as the original set)
    seed: int | None = None             # sampling seed (None: the original set's, so the same latents)
    which: str = "best"                 # best | last checkpoint of both classifiers
    aggregation: str = "after_softmax"  # image score behind accuracy
    n: int = 100                        # most predictive patches kept per class and classifier
    face_parser: str | None = None      # BiSeNet 79999_iter.pth; None: the low-level flat/edge/texture segmenter
    patch_seed: int = 0                 # random baseline patches
    sample_batch_size: int = 16         # images per sampling step (does not change pixels)
    batch_size: int = 64                # images per scoring batch
    device: str = "auto"
    precision: str = "auto"             # scoring precision; training keeps the old run's
    workers: int = 0
    on_bad_image: str = "skip"

    def __post_init__(self) -> None:
        for name in ("classifier", "generator", "weights", "out", "device"):
            check_text(self, name)
        check_int(self, "latent_dim", 1, optional=True)
        check_int(self, "resolution", 1, optional=True)
        for name in ("real", "original_fakes", "face_parser"):
            check_text(self, name, optional=True)
        check_counts(self, "counts", optional=True)
        check_int(self, "seed", 0, optional=True)
        check_choice(self, "which", CHECKPOINT_CHOICES)
        check_choice(self, "aggregation", AGGREGATIONS)
        check_int(self, "n", 1)
        check_int(self, "patch_seed", 0)
        for name in ("sample_batch_size", "batch_size"):
            check_int(self, name, 1)
        check_choice(self, "precision", PRECISIONS)
        check_int(self, "workers", 0)
        check_choice(self, "on_bad_image", BAD_IMAGE_POLICIES)


def _check_out(config: RetrainStudyConfig, resume: bool, force: bool) -> None:
    RUN_FOLDER.check(config.out, config, resume=resume, force=force)


def _patches_cached(checkpoint: Path, result: RetrainResult, folder: Path, segmenter: Segmenter,
                    config: RetrainStudyConfig, force: bool) -> tuple[dict[str, Any], str]:
    """Top and random patches of one classifier on the finetuned fakes and the reals, read back when current."""
    inputs = {"checkpoint_sha256": checkpoint_sha256(checkpoint), "real": str(result.reals),
              "fake": str(result.fakes), "split": TEST_SPLIT, "n": config.n, "seed": config.patch_seed,
              "segmenter": segmenter.name, "classes": list(segmenter.classes), "face_parser": config.face_parser}
    if not force and stage_is_current(folder, inputs, "patches.json"):
        return json.loads((folder / "patches.json").read_text()), "reused"
    summary = run_patches(str(checkpoint), str(result.reals), str(result.fakes), out=str(folder), split=TEST_SPLIT,
                          n=config.n, segmenter=segmenter, seed=config.patch_seed, batch_size=config.batch_size,
                          device=config.device, precision=config.precision, workers=config.workers,
                          on_bad_image=config.on_bad_image, force=True)
    record_stage(folder, inputs)
    return summary, "ran"


# ----------------------------------------------------------------------------- the comparison

def _histogram(class_ids: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    counts = class_histogram(class_ids, classes)
    total = sum(counts.values())
    return {"n": total, "counts": counts,
            "fractions": {name: (count / total if total else 0.0) for name, count in counts.items()}}


def patch_histograms(patches: Mapping[str, Mapping[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """Per image class (fake, real): class histograms of the old and new classifiers' top patches and of the
    random baseline. The baseline is one random patch of every image either classifier kept: the random cell
    of an image depends only on (seed, image), so both runs drew the same one."""
    out: dict[str, Any] = {}
    for label_id, label in ((1, "fake"), (0, "real")):
        per = {who: _histogram([r["semantic"] for r in patches[who]["top"] if r["label"] == label_id], classes)
               for who in CLASSIFIERS}
        pooled = {r["index"]: r["semantic"] for who in CLASSIFIERS for r in patches[who]["random"]
                  if r["label"] == label_id}
        per["random"] = _histogram([pooled[i] for i in sorted(pooled)], classes)
        per["share_change"] = {c: per["new"]["fractions"][c] - per["old"]["fractions"][c] for c in classes}
        out[label] = per
    return out


def comparison_rows(metrics: Mapping[str, Any], histograms: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The long-format table of comparison.csv: table, classifier, subset, name, value."""
    rows = [{"table": "metric", "classifier": who, "subset": name, "name": key, "value": value}
            for who in CLASSIFIERS for name in TEST_SETS for key, value in metrics[who][name].items()]
    for label, per in histograms.items():
        for who in (*CLASSIFIERS, "random"):
            rows += [{"table": "patch_count", "classifier": who, "subset": label, "name": c, "value": v}
                     for c, v in per[who]["counts"].items()]
            rows += [{"table": "patch_fraction", "classifier": who, "subset": label, "name": c, "value": v}
                     for c, v in per[who]["fractions"].items()]
    return rows


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _share_list(changes: Mapping[str, float], sign: int) -> str:
    picked = sorted(((c, d) for c, d in changes.items() if sign * d > 1e-9), key=lambda item: -sign * item[1])
    return ", ".join(f"{c} {d:+.3f}" for c, d in picked) or "none"


def summary_text(comparison: Mapping[str, Any]) -> str:
    """The study's answer to "what is still detectable after finetuning?", in numbers from the results."""
    m, patches = comparison["metrics"], comparison["patches"]
    lines = [f"What is still detectable after finetuning? ({comparison['aggregation']} image scores, "
             f"{TEST_SPLIT} split)"]
    for who in CLASSIFIERS:
        for name in TEST_SETS:
            r = m[who][name]
            lines.append(f"{WHO[who]} on {SET_NAMES[name]}: AP {_fmt(r['ap'])}, accuracy {_fmt(r['acc'])} "
                         f"(fake {_fmt(r['acc_fake'])}, real {_fmt(r['acc_real'])}, n={r['n']})")
    lines.append(f"old classifier accuracy on finetuned fakes: {_fmt(m['old']['finetuned']['acc'])} "
                 f"(was {_fmt(m['old']['original']['acc'])} on original fakes); AP {_fmt(m['old']['finetuned']['ap'])} "
                 f"(was {_fmt(m['old']['original']['ap'])}); retrained classifier AP on finetuned fakes: "
                 f"{_fmt(m['new']['finetuned']['ap'])}, accuracy {_fmt(m['new']['finetuned']['acc'])}")
    for label in LABELS:
        per = patches["histograms"][label]
        lines.append(f"most predictive patches on {'finetuned fakes' if label == 'fake' else 'reals'} "
                     f"({patches['segmenter']} classes; n = {per['old']['n']} old, {per['new']['n']} retrained, "
                     f"{per['random']['n']} random):")
        lines.append(f"  {'class':<14} {'old':>7} {'retrained':>10} {'random':>7}")
        for c in patches["classes"]:
            lines.append(f"  {c:<14} {per['old']['fractions'][c]:>7.3f} {per['new']['fractions'][c]:>10.3f} "
                         f"{per['random']['fractions'][c]:>7.3f}")
        lines.append(f"  patch classes gaining share (retrained vs old): {_share_list(per['share_change'], 1)}")
        lines.append(f"  patch classes losing share: {_share_list(per['share_change'], -1)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the figure

def _bars(ax, x: np.ndarray, values: Sequence[float], width: float, **style: Any) -> None:
    heights = [0.0 if v is None or math.isnan(v) else float(v) for v in values]
    bars = ax.bar(x, heights, width, **style)
    for bar, value in zip(bars, values):
        ax.annotate(_fmt(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)


def plot_comparison(comparison: Mapping[str, Any], path: str | Path) -> None:
    """Left: AP and accuracy of old vs retrained classifier on original vs finetuned fakes. Right: class
    fractions of their most predictive patches vs random patches, on finetuned fakes (top) and reals (bottom)."""
    m, patches = comparison["metrics"], comparison["patches"]
    classes = patches["classes"]
    many = len(classes) > 4
    right = max(5.0, 0.55 * len(classes))  # inches; the metrics panel keeps 5 in, the legend gets 2.5 in
    fig = Figure(figsize=(5.0 + right + 2.5, 6.4))
    grid = fig.add_gridspec(2, 2, width_ratios=(5.0, right), hspace=0.8 if many else 0.6, wspace=0.25)
    ax = fig.add_subplot(grid[:, 0])
    groups = [(key, name) for key in ("ap", "acc") for name in TEST_SETS]
    x, width = np.arange(len(groups)), 0.38
    for offset, who in zip((-width / 2, width / 2), CLASSIFIERS):
        _bars(ax, x + offset, [m[who][name][key] for key, name in groups], width, color=COLORS[who],
              label=WHO[who])
    ax.axhline(0.5, color="0.5", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xticks(x, [f"{'AP' if key == 'ap' else 'accuracy'}\n{name}" for key, name in groups], fontsize=8)
    ax.set_xlabel("metric and test fakes (the same reals in both)", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("score (fake = positive class)")
    ax.set_title("Detection: old vs retrained classifier", fontsize=10)
    ax.legend(frameon=False, loc="upper center", ncol=3, fontsize=8)
    for row, label in enumerate(LABELS):
        per = patches["histograms"][label]
        ax = fig.add_subplot(grid[row, 1])
        cx, cw = np.arange(len(classes)), 0.27
        for offset, who in zip((-cw, 0.0, cw), (*CLASSIFIERS, "random")):
            ax.bar(cx + offset, [per[who]["fractions"][c] for c in classes], cw, color=COLORS[who],
                   label=WHO[who] if who == "random" else f"{WHO[who]}: most predictive patch")
        ax.set_xticks(cx, classes, rotation=35 if many else 0, ha="right" if many else "center", fontsize=8)
        tallest = max(per[who]["fractions"][c] for who in (*CLASSIFIERS, "random") for c in classes)
        ax.set_ylim(0, min(1.0, tallest * 1.15) if tallest > 0 else 1.0)
        ax.set_ylabel("fraction of patches", fontsize=9)
        ax.set_xlabel(f"semantic class ({patches['segmenter']} segmenter)", fontsize=8)
        ax.set_title(f"{'Finetuned fakes' if label == 'fake' else 'Reals'}: one patch per image "
                     f"(n = {per['old']['n']} old, {per['new']['n']} retrained, {per['random']['n']} random)",
                     fontsize=9)
        if row == 0:
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("What is still detectable after finetuning?", fontsize=12)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the study

def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["table", "classifier", "subset", "name", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def run_retrain_study(config: RetrainStudyConfig, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Retrain on the finetuned generator (attacks.retrain), find both classifiers' most predictive patches on
    its fakes and the reals, and write comparison.json/.csv/.png and summary.txt into OUT.

    OUT also holds config.yaml, retrain/ (fakes, new classifier, evaluations) and patches/{old,new}/
    (analysis.patches results). An existing OUT is refused unless `resume` (finished stages are reused,
    unfinished ones continue) or `force` (every stage is redone).

    Under torchrun every rank shares the retrain stages (sampling, training, scoring: `attacks.retrain`); rank 0
    alone checks and writes OUT, finds the patches and writes the comparison, and every rank returns its summary.
    """
    with distributed.alike():  # the same inputs on every rank: a refusal is printed once
        for name in ("classifier", "generator", "out"):
            require(config, name)
        distributed.setup(resolve_device(config.device))
    out, held = Path(config.out), {}
    fresh = distributed.run_on_main(_claim_out, config, resume, force, held)  # its refusal stops every rank
    try:
        settings = RetrainConfig(classifier=config.classifier, generator=config.generator, weights=config.weights,
                                 latent_dim=config.latent_dim, resolution=config.resolution, out=str(out / "retrain"),
                                 real=config.real, original_fakes=config.original_fakes, counts=config.counts,
                                 seed=config.seed, which=config.which, aggregation=config.aggregation,
                                 device=config.device, precision=config.precision,
                                 sample_batch_size=config.sample_batch_size, eval_batch_size=config.batch_size,
                                 workers=config.workers, on_bad_image=config.on_bad_image)
        result = retrain(settings, resume=True, force=force)
    except BaseException:
        # Nothing computed yet (bad generator, missing run): leave no claim on OUT, so a corrected retry starts clean.
        if distributed.is_main() and fresh and not (out / "retrain" / "config.yaml").is_file():
            (out / "config.yaml").unlink(missing_ok=True)
        raise
    return distributed.run_on_main(_compare_alone, config, result, held.get("segmenter"), force)


def _claim_out(config: RetrainStudyConfig, resume: bool, force: bool, held: dict[str, Any]) -> bool:
    """Check OUT, load the segmenter (a missing face parser fails before anything is computed) and record the
    settings; True when OUT held no study before. The segmenter stays in `held`, on this rank only."""
    _check_out(config, resume, force)
    out = Path(config.out)
    held["segmenter"] = make_segmenter(config.face_parser, resolve_device(config.device))
    fresh = not (out / "config.yaml").is_file()
    out.mkdir(parents=True, exist_ok=True)
    RUN_FOLDER.save(out, config)
    return fresh


def _compare_alone(config: RetrainStudyConfig, result: RetrainResult, segmenter: Segmenter,
                   force: bool) -> dict[str, Any]:
    """The patches of both classifiers and the comparison files: not sharded, so one process does it all."""
    with distributed.alone():
        return _compare(config, result, segmenter, force)


def _compare(config: RetrainStudyConfig, result: RetrainResult, segmenter: Segmenter,
             force: bool) -> dict[str, Any]:
    out = Path(config.out)
    patches, stages = {}, dict(result.stages)
    for who, checkpoint in zip(CLASSIFIERS, (result.base_checkpoint, result.classifier_checkpoint)):
        patches[who], stages[f"patches_{who}"] = _patches_cached(checkpoint, result, out / "patches" / who,
                                                                 segmenter, config, force)
    histograms = patch_histograms(patches, segmenter.classes)
    comparison = {"base_checkpoint": str(result.base_checkpoint), "retrained": str(result.classifier),
                  "generator": str(config.generator), "fakes": str(result.fakes), "reals": str(result.reals),
                  "original_fakes": str(result.original_fakes), "aggregation": result.aggregation,
                  "split": TEST_SPLIT, "metrics": result.metrics,
                  "patches": {"segmenter": segmenter.name, "classes": list(segmenter.classes), "n": config.n,
                              "seed": config.patch_seed, "histograms": histograms}}
    text = summary_text(comparison)
    write_json(out / "comparison.json", comparison)
    _write_csv(out / "comparison.csv", comparison_rows(result.metrics, histograms))
    plot_comparison(comparison, out / "comparison.png")
    write_text(out / "summary.txt", text)
    log.info("retrain study written to %s", out)
    return {"out": str(out), "comparison": comparison, "summary": text, "stages": stages,
            "files": {name: str(out / name) for name in ("comparison.json", "comparison.csv", "comparison.png",
                                                          "summary.txt")}}
