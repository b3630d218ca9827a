"""`patchscope report RUN_DIR`: one self-contained HTML page of everything a run directory holds.

The directory is walked; each folder is recognised by the files the stages write (training log, eval metrics,
heatmaps, patches, spectra, exaggeration, finetuning, retraining, the demo's summary) and becomes a section,
in pipeline order.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from patchscope.analysis.report.html import escape, page, paragraph
from patchscope.analysis.report.sections import (ReportContext, Section, as_mapping, build_eval, build_heatmaps, build_patches,
                                      build_robustness, build_spectra, build_training)
from patchscope.analysis.report.studies import (build_demo_summary, build_exaggerate, build_finetune, build_retrain,
                                     build_retrain_study)
from patchscope.analysis.report.summary import Found, render_summary
from patchscope.common.atomic import write_text
from patchscope.common.errors import InputError

log = logging.getLogger("patchscope.report")

REPORT_FILE = "report.html"
# Folders never holding results, but possibly thousands of files: patch crops, TensorBoard event files.
SKIPPED_FOLDERS = {"crops", "tensorboard", "__pycache__"}
# Files only an attack study writes beside its metrics.jsonl: such a log is not a classifier's training log.
STUDY_FILES = {"shift.json", "before_after.json", "generator.pt", "sources.json"}


@dataclass(frozen=True)
class Stage:
    """One kind of result folder: how it is recognised, what the error message says it looked for, its builder."""

    title: str
    looks_for: str
    detect: Callable[[Path, set[str], ReportContext], bool]
    build: Callable[[Path, ReportContext, Section], None]  # fills the section: caption, parts, notes


def _metrics_json(folder: Path, names: set[str], ctx: ReportContext) -> dict[str, Any]:
    """metrics.json is written by eval ("results"), exaggerate ("rows") and retrain ("metrics"): told apart here."""
    return as_mapping(ctx.json(folder / "metrics.json")) if "metrics.json" in names else {}


def _is_training(folder: Path, names: set[str], ctx: ReportContext) -> bool:
    return bool(names & {"best.json", "last.json"}) or ("metrics.jsonl" in names and not names & STUDY_FILES)


def _is_eval(folder: Path, names: set[str], ctx: ReportContext) -> bool:
    return "pr_curve.png" in names or isinstance(_metrics_json(folder, names, ctx).get("results"), dict)


def _is_exaggerate(folder: Path, names: set[str], ctx: ReportContext) -> bool:
    rows = _metrics_json(folder, names, ctx).get("rows")
    return "shift.json" in names or (isinstance(rows, list) and any(isinstance(r, dict) and "k" in r for r in rows))


def _is_finetune(folder: Path, names: set[str], ctx: ReportContext) -> bool:
    return "before_after.json" in names or ("metrics.jsonl" in names and bool(names & {"generator.pt", "sources.json"}))


def _is_retrain(folder: Path, names: set[str], ctx: ReportContext) -> bool:
    """attacks.retrain's own folder, unless a retrain study around it already shows its numbers."""
    metrics = _metrics_json(folder, names, ctx).get("metrics")
    return isinstance(metrics, dict) and not (folder.parent / "comparison.json").is_file()


def _has(*files: str) -> Callable[[Path, set[str], ReportContext], bool]:
    return lambda folder, names, ctx: bool(names & set(files))


def _has_prefix(prefix: str, *files: str) -> Callable[[Path, set[str], ReportContext], bool]:
    return lambda folder, names, ctx: bool(names & set(files)) or any(
        n.startswith(prefix) and n.endswith(".png") for n in names)


# In pipeline order: the page shows the stages in this order, and each stage's folders from the top down.
STAGES = (
    Stage("Demo summary", "demo_summary.json", _has("demo_summary.json"), build_demo_summary),
    Stage("Training", "metrics.jsonl or best.json (training)", _is_training, build_training),
    Stage("Evaluation", "metrics.json with results or pr_curve.png (evaluation)", _is_eval, build_eval),
    Stage("Heatmaps", "heatmaps.json or average_heatmaps.png", _has("heatmaps.json", "average_heatmaps.png"),
          build_heatmaps),
    Stage("Robustness", "robustness.json", _has("robustness.json", "robustness.png"), build_robustness),
    Stage("Most predictive patches", "patches.json or sheet_*.png", _has_prefix("sheet_", "patches.json"),
          build_patches),
    Stage("Spectra", "spectra.json", _has("spectra.json", "spectra.png"), build_spectra),
    Stage("Exaggeration", "shift.json (exaggeration)", _is_exaggerate, build_exaggerate),
    Stage("Finetuning", "before_after.json (finetuning)", _is_finetune, build_finetune),
    Stage("Retrain study", "comparison.json (retrain study)", _has("comparison.json", "comparison.png"),
          build_retrain_study),
    Stage("Retraining", "metrics.json with metrics (retraining)", _is_retrain, build_retrain),
)


def find_stages(root: Path, ctx: ReportContext) -> list[tuple[Stage, Path]]:
    """Every (stage, folder) under `root` (itself included), in pipeline order, then top-down by path."""
    found = []
    for current, folders, files in os.walk(root):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in SKIPPED_FOLDERS)
        folder, names = Path(current), set(files)
        found += [(stage, folder) for stage in STAGES if stage.detect(folder, names, ctx)]
    return sorted(found, key=lambda item: (STAGES.index(item[0]), len(item[1].parts), item[1].as_posix()))


def _build(stage: Stage, folder: Path, ctx: ReportContext) -> Section:
    section = Section(stage.title, ctx.display(folder), caption="", path=ctx.where(folder))
    try:
        stage.build(folder, ctx, section)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        # Result files of another version, or edited by hand: keep what was shown, say what failed.
        section.notes.append(f"Not shown in full: the files here are not as expected ({type(err).__name__}: {err})")
    return section


def _name(section: Section) -> str:
    return section.title if section.folder == "." else f"{section.title}: {section.folder}"


def _render_section(section: Section, anchor: str) -> str:
    # A name that writes a repeated folder once carries the folder as it is on disk in its tooltip.
    where = f' title="folder {escape(section.path)}"' if section.path and section.path != section.folder else ""
    parts = [f'<section id="{anchor}">', f"<h2{where}>{escape(_name(section))}</h2>"] + (
        [paragraph(section.caption)] if section.caption else [])
    parts += [paragraph(note, "note") for note in section.notes]
    return "\n".join([*parts, *section.parts, "</section>"])


def render_report(run_dir: str | os.PathLike, title: str | None = None) -> str:
    """The report page of `run_dir` as a string; InputError when it holds nothing a stage writes."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected a run directory holding patchscope results)")
    ctx = ReportContext(root)
    found = find_stages(root, ctx)
    sections = [_build(stage, folder, ctx) for stage, folder in found]
    if not sections:
        raise InputError(f"{root}: nothing to report; looked for {'; '.join(s.looks_for for s in STAGES)} "
                         f"in it and its subfolders")
    anchors = [f"section-{i + 1}" for i in range(len(sections))]
    toc = [(anchor, _name(s)) for anchor, s in zip(anchors, sections)]
    body = [_render_section(s, a) for s, a in zip(sections, anchors)]
    # The key numbers first; a demo folder opens with its own summary instead.
    summary = "" if any(stage.title == "Demo summary" for stage, _ in found) else render_summary(
        [Found(stage.title, folder, anchor, _name(s)) for (stage, folder), s, anchor in zip(found, sections, anchors)],
        ctx)
    if summary:
        toc.insert(0, ("section-summary", "Key numbers"))
        body.insert(0, summary)
    title = title or f"patchscope report: {root.resolve().name}"
    subtitle = (f"{root.resolve()}: {len(sections)} section(s), {ctx.embedder.count} embedded image(s), "
                f"{ctx.embedder.used_bytes / 2**20:.1f} MiB")
    return page(title, subtitle, toc, body)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Write the report page of `run_dir` (atomically) to `out` (a file, or a folder for report.html);
    by default RUN_DIR/report.html. The page is a view of the results: writing it again replaces it."""
    text = render_report(run_dir, title)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    if path.is_dir():
        path = path / REPORT_FILE
    write_text(path, text)
    log.info("report: %s (%.1f MiB)", path, len(text) / 2**20)
    return path
