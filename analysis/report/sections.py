"""Run report sections of the classifier stages — training, evaluation, robustness, heatmaps, patches, spectra —
and the context they share (where the run is, cached JSON, embedded images). Used by `analysis.report`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from patchscope.analysis.heatmaps import GROUP_TITLES, GROUPS
from patchscope.common.userfiles import read_json, read_regular
from patchscope.analysis.report import locations
from patchscope.analysis.report.curves import (TRAINING_PANELS, Panel, coincide_text, plot_log, plot_pr, read_log,
                                               read_scores)
from patchscope.analysis.report.glossary import terms_note
from patchscope.analysis.report.html import (Column, ImageEmbedder, ImageSkipped, details, figure, format_short, format_value,
                                  heading, key_values, paragraph, preformatted, table)

MAX_CONFIG_BYTES = 16 << 20  # a config.yaml is a few kB; a larger one is named in a note, unread
MAX_CARDS = 16       # heatmap cards in one report: each is a wide PNG, the full sets stay on heatmaps.html
CARDS_PER_GROUP = 1  # per heatmap folder and group (easiest/hardest real/fake)
METRIC_COLUMNS = (Column("ap", "AP"), Column("ap_real", "AP (real+)"), Column("roc_auc", "ROC AUC"),
                  Column("acc", "acc"), Column("acc_real", "acc real"), Column("acc_fake", "acc fake"))


@dataclass
class Section:
    """One block of the page: a heading naming the stage and its folder, a caption, HTML parts, notes."""

    title: str
    folder: str
    caption: str
    parts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # plain text: files that could not be shown, and why
    path: str = ""  # the folder relative to the root as on disk, when `folder` names it shorter

    def add(self, *parts: str) -> None:
        self.parts.extend(p for p in parts if p)


@dataclass
class ReportContext:
    """What every builder needs: the report's root, one image embedder (one byte budget), parsed JSON."""

    root: Path
    embedder: ImageEmbedder = field(default_factory=ImageEmbedder)
    cards_left: int = MAX_CARDS
    _json: dict[Path, tuple[Any, str | None]] = field(default_factory=dict)

    def where(self, path: Path) -> str:
        """A path as the page names it: relative to the report's root."""
        return path.relative_to(self.root).as_posix()

    def display(self, path: Path) -> str:
        """A folder as a section's name shows it: relative to the root, a folder named like the one holding it
        written once (a retrain study's retrain/retrain/classifier reads retrain/classifier)."""
        parts = path.relative_to(self.root).parts
        return "/".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]) or "."

    def json(self, path: Path, section: Section | None = None) -> Any:
        """Parsed JSON (NaN allowed), cached; None when missing or unreadable (a note in `section` says so)."""
        if path not in self._json:
            try:  # regular files only, size- and depth-bounded: a FIFO, a sparse giant or 10^5 nested lists
                self._json[path] = (read_json(path, "a JSON results file") if path.exists() else None, None)
            except (OSError, ValueError) as err:
                reason = str(err).replace(f"{path}: ", "", 1).splitlines()[0][:120]
                self._json[path] = (None, f"{type(err).__name__}: {reason}")
        data, problem = self._json[path]
        if problem and section is not None:
            section.notes.append(f"{self.where(path)}: unreadable ({problem})")
        return data

    def image(self, section: Section, path: Path, caption: str, pixels: bool = False, wide: bool = False) -> str:
        """The figure of an image file (empty when absent); a note when it cannot be shown."""
        if not path.is_file():
            return ""
        try:
            uri = self.embedder.file(path)
        except ImageSkipped as err:
            section.notes.append(f"{self.where(path)}: not shown, {err}")
            return ""
        return figure(uri, f"{caption} [{self.where(path)}]", alt=caption, pixels=pixels, wide=wide)

    def png(self, section: Section, data: bytes | None, caption: str) -> str:
        if data is None:
            return ""
        try:
            return figure(self.embedder.data(data, "image/png"), caption, alt=caption)
        except ImageSkipped as err:
            section.notes.append(f"{caption}: not shown, {err}")
            return ""

    def config(self, section: Section, folder: Path, open_: bool = False) -> str:
        """The folder's resolved settings (config.yaml) as written, in a fold."""
        path = folder / "config.yaml"
        if not path.is_file():
            return ""
        try:
            text = read_regular(path, "settings (config.yaml)", MAX_CONFIG_BYTES).decode("utf-8")
        except (OSError, ValueError) as err:
            section.notes.append(f"{self.where(path)}: unreadable ({type(err).__name__})")
            return ""
        return details(f"Resolved settings [{self.where(path)}]", preformatted(text), open_)

    def log_curves(self, section: Section, folder: Path, panels: Sequence[Panel], title: str, caption: str,
                   best_key: str | None = None) -> list[dict[str, Any]]:
        """The figure of the folder's metrics.jsonl (appended to `section`); returns its records."""
        path = folder / "metrics.jsonl"
        if not path.is_file():
            return []
        try:
            records, skipped = read_log(path)
        except (OSError, ValueError) as err:
            section.notes.append(f"{self.where(path)}: unreadable ({type(err).__name__})")
            return []
        if skipped:
            section.notes.append(f"{self.where(path)}: {skipped} line(s) skipped (not JSON objects)")
        best = records[-1].get(best_key) if records and best_key else None
        mark = (best, f"best epoch ({best})") if isinstance(best, (int, float)) and best > 0 else None
        image = plot_log(records, panels, f"{title} [{self.where(path)}]", mark)
        if image is None:
            section.notes.append(f"{self.where(path)}: no numbers to plot")
        section.add(self.png(section, image, f"{caption} [{self.where(path)}]"))
        return records


def as_mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------- training

def build_training(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = "A patch classifier's training run: one log line per epoch, best and last checkpoints."
    section.add(heading(3, "Training curves"))
    records = ctx.log_curves(
        section, folder, TRAINING_PANELS, "Training", best_key="best_epoch",
        caption="Per epoch: patch-wise cross entropy on training crops; patch accuracy on training and validation "
                "crops; validation AP and accuracy of image scores (mean patch P(fake)). Dotted: the best epoch "
                "(highest validation patch accuracy), kept as best.safetensors")
    if records:
        last = records[-1]
        timed = [r["seconds"] for r in records if isinstance(r.get("seconds"), (int, float))]
        section.add(key_values([("epochs logged", len(records)), ("last epoch", last.get("epoch")),
                                ("best epoch", last.get("best_epoch")),
                                ("best validation patch accuracy", last.get("best_val_patch_acc")),
                                ("last train loss", last.get("train_loss")), ("last validation AP", last.get("val_ap")),
                                ("training time (s)", f"{sum(timed):.1f}" if timed else None),
                                ("images per second (last epoch)", last.get("images_per_s"))]))
    rows = []
    for name in ("best", "last"):
        meta = as_mapping(ctx.json(folder / f"{name}.json", section))
        if meta:
            val = as_mapping(meta.get("val"))
            rows.append({"checkpoint": name, "epoch": meta.get("epoch"), "model": meta.get("model"), **val})
    if rows:
        section.add(heading(3, "Checkpoints"), paragraph("Validation metrics stored with each checkpoint."),
                    table([Column("checkpoint", "checkpoint"), Column("model", "model"), Column("epoch", "epoch"),
                           *METRIC_COLUMNS, Column("patch_acc", "patch acc"), Column("patch_ap", "patch AP"),
                           Column("n", "n")], rows))
    section.add(ctx.config(section, folder, open_=True))


# ----------------------------------------------------------------------------- evaluation

def build_eval(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("Image scores on each test set for every aggregation of patch predictions (after_softmax: mean "
                       "patch P(fake), the paper's; before_softmax: softmax of the mean logits; vote: share of patches "
                       "voting fake). AP takes fake as the positive class; AP (real+) is the public code's convention. "
                       "Bold rows: the aggregation behind the accuracy and the PR curve.")
    summary = as_mapping(ctx.json(folder / "metrics.json", section))
    if summary:
        chosen = summary.get("aggregation")
        section.add(key_values([("model", summary.get("model")), ("checkpoint epoch", summary.get("checkpoint_epoch")),
                                ("classifier", summary.get("run")), ("split", summary.get("split")),
                                ("load / crop size", " / ".join("none" if summary.get(k) is None else str(summary[k])
                                                                for k in ("load_size", "crop_size"))),
                                ("aggregation for accuracy and PR curve", chosen)]))
        rows = [{"test_set": name, "aggregation": mode, **as_mapping(metrics)}
                for name, per_mode in as_mapping(summary.get("results")).items()
                for mode, metrics in as_mapping(per_mode).items()]
        section.add(heading(3, "Metrics"), table(
            [Column("test_set", "test set", name=True), Column("aggregation", "aggregation"), *METRIC_COLUMNS,
             Column("patch_ap", "patch AP"), Column("patch_acc", "patch acc"), Column("n_real", "n real"),
             Column("n_fake", "n fake")], rows, highlight=lambda row: row["aggregation"] == chosen),
                    terms_note("AP", "AP (real+)", "ROC AUC", "acc", "acc real", "acc fake", "patch AP", "patch acc",
                               "after_softmax", "before_softmax", "vote"))
    curve = _pr_from_scores(folder, summary, ctx, section) or ctx.image(
        section, folder / "pr_curve.png", "Precision-recall curves, fake as the positive class")
    if curve:
        section.add(heading(3, "Precision-recall curves"), curve)
    section.add(ctx.config(section, folder))


def _pr_from_scores(folder: Path, summary: dict[str, Any], ctx: ReportContext, section: Section) -> str:
    """The PR curves redrawn from the saved per-image scores (scores_<test set>.csv), every curve its own style,
    with a note naming curves that coincide; empty when a scores file is missing (the saved pr_curve.png then)."""
    names = list(as_mapping(summary.get("results")))
    paths = [folder / f"scores_{name}.csv" for name in names]
    if not names or not all(path.is_file() for path in paths):
        return ""
    try:
        curves = {name: read_scores(path) for name, path in zip(names, paths)}
    except (OSError, ValueError, TypeError) as err:
        section.notes.append(f"PR curves not redrawn: a scores_<test set>.csv is not as expected "
                             f"({type(err).__name__}: {str(err)[:120]}); the saved pr_curve.png, if any, is shown")
        return ""
    image, groups = plot_pr(curves, f"{summary.get('model')} ({summary.get('aggregation')})")
    note = coincide_text(groups, "the curves of test sets")
    files = "/".join(p for p in (ctx.where(folder), "scores_<test set>.csv") if p != ".")
    return ctx.png(section, image, f"Precision-recall curves, fake as the positive class, from the image scores "
                                   f"[{files}]") + (paragraph(note, "note") if note else "")


def build_robustness(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("The classifier on the same test set re-compressed (JPEG) or blurred at test time; the first "
                       "row is the clean set.")
    data = as_mapping(ctx.json(folder / "robustness.json", section))
    if data:
        section.add(key_values([("model", data.get("model")), ("real", data.get("real")), ("fake", data.get("fake")),
                                ("aggregation", data.get("aggregation"))]))
        rows = [as_mapping(r) for r in data.get("rows") or []]
        rows = [{**r, "perturbation": "clean" if r.get("level") is None else r.get("perturbation")} for r in rows]
        section.add(table([Column("perturbation", "perturbation"), Column("level", "level", format_short),
                           *METRIC_COLUMNS[:2], *METRIC_COLUMNS[3:], Column("n", "n")], rows))
    section.add(ctx.image(section, folder / "robustness.png", "AP and accuracies against the perturbation level"),
                ctx.config(section, folder))


# ----------------------------------------------------------------------------- heatmaps

def _cards(folder: Path, data: dict[str, Any]) -> list[tuple[Path, str]]:
    """(card file, caption) of the first cards of each group, from heatmaps.json or the folders."""
    groups = as_mapping(data.get("groups"))
    cards = []
    for group in GROUPS:
        entries = [e for e in groups.get(group) or [] if isinstance(e, dict) and e.get("card")]
        if entries:
            for entry in entries[:CARDS_PER_GROUP]:
                cards.append((folder / group / Path(str(entry["card"])).name,
                              f"{GROUP_TITLES[group]}: {Path(str(entry.get('source', ''))).name}, "
                              f"label {entry.get('label')}, image P(fake) {format_value(entry.get('score'))}"))
        else:
            cards += [(path, f"{GROUP_TITLES[group]}: {path.name}")
                      for path in sorted((folder / group).glob("*.png"))[:CARDS_PER_GROUP]]
    return cards


def build_heatmaps(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("Patch P(fake) placed at each patch's receptive-field centre, 0 (blue) to 1 (red): the mean "
                       "map of the easiest and hardest images of each class, then one card per group (input, map, "
                       "overlay).")
    data = as_mapping(ctx.json(folder / "heatmaps.json", section))
    if data:
        section.add(key_values([("model", data.get("model")), ("images per group", data.get("n")),
                                ("interpolation", data.get("mode"))]))
    average = ctx.image(section, folder / "average_heatmaps.png", "Average P(fake) heatmap per group", wide=True)
    if average:
        section.add(heading(3, "Average heatmaps"), average)
    cards = _cards(folder, data)
    shown = cards[:max(ctx.cards_left, 0)]
    ctx.cards_left -= len(shown)
    figures = [ctx.image(section, path, caption, pixels=True) for path, caption in shown]
    if any(figures):
        section.add(heading(3, "Example cards"), '<div class="cards">' + "".join(figures) + "</div>")
    if len(shown) < len(cards):
        section.notes.append(f"{len(cards) - len(shown)} heatmap card(s) left out: the report shows at most "
                             f"{MAX_CARDS}")
    if (folder / "heatmaps.html").is_file():
        section.add(paragraph(f"Every card: {ctx.where(folder / 'heatmaps.html')} (a page beside the images)."))


# ----------------------------------------------------------------------------- patches and spectra

def _ordered_pngs(folder: Path, prefix: str) -> list[Path]:
    """prefix_fake.png, prefix_real.png, then any other prefix_*.png."""
    found = sorted(folder.glob(f"{prefix}_*.png"))
    return sorted(found, key=lambda p: {f"{prefix}_fake.png": 0, f"{prefix}_real.png": 1}.get(p.name, 2))


def build_patches(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("For each image the patch most sure of its true class; contact sheets of the surest ones, and "
                       "the semantic classes of these patches against one random patch per image.")
    data = as_mapping(ctx.json(folder / "patches.json", section))
    if data:
        rf = as_mapping(data.get("receptive_field"))
        section.add(key_values([("model", data.get("model")), ("checkpoint epoch", data.get("checkpoint_epoch")),
                                ("images kept" + (" per class" if data.get("per_class") else ""), data.get("n")),
                                ("receptive field (px)", rf.get("size")), ("input size", data.get("input_size")),
                                ("segmenter", data.get("segmenter"))]))
        histograms = as_mapping(data.get("histograms"))
        labels = sorted(histograms, key=lambda name: {"fake": 0, "real": 1}.get(name, 2))
        rows = [{"class": cls, **{f"{label}_{who}": as_mapping(as_mapping(as_mapping(histograms[label]).get(who)).get(
            "fractions")).get(cls) for label in labels for who in ("top", "baseline")}}
                for cls in data.get("classes") or []]
        if rows:
            section.add(heading(3, "Semantic classes (fraction of patches)"), table(
                [Column("class", "class")] + [Column(f"{label}_{who}", f"{label}: {name}") for label in labels
                                              for who, name in (("top", "most predictive"), ("baseline", "random"))],
                rows))
        _locations(data, ctx, section)
        section.add(terms_note("most predictive", "random", "border", "corner", "expected from area", "P(fake)"))
    for path in _ordered_pngs(folder, "sheet"):
        label = path.stem.split("_", 1)[1]
        section.add(ctx.image(section, path, f"{label} images: most predictive patches, P({label}) and class",
                              pixels=True))
    for path in _ordered_pngs(folder, "histogram"):
        section.add(ctx.image(section, path, f"{path.stem.split('_', 1)[1]} images: classes of the most predictive "
                                             f"vs random patches"))
    section.add(ctx.config(section, folder))


def _locations(data: dict[str, Any], ctx: ReportContext, section: Section) -> None:
    """Where the top patches sit: border and corner shares against area and random patches, and their heatmap."""
    if not data.get("top"):
        return
    try:
        layout = locations.layout_of(data)
        rows, image = locations.location_rows(data, layout), locations.location_figure(data, layout)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        section.notes.append(f"Patch locations not shown: patches.json lacks their geometry ({type(err).__name__}: "
                             f"{str(err)[:120]})")
        return
    section.add(heading(3, "Where the most predictive patches sit"), paragraph(locations.definition_text(layout)),
                table([Column("patches", "patches"), Column("n", "n"),
                       Column("border", "border", locations.percent), Column("corner", "corner", locations.percent),
                       Column("densest", "densest position (share of the patches)", name=True)], rows),
                ctx.png(section, image, "Share of the most predictive patches per output position, at the position's "
                                        "receptive-field centre in the image; dashed: the inner edge of the border "
                                        "band"))


def build_spectra(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("Average log-magnitude spectra of the high-pass residual (image minus its 3x3 median) of real "
                       "and fake images, and their difference; generator upsampling shows as peaks away from the "
                       "centre.")
    data = as_mapping(ctx.json(folder / "spectra.json", section))
    if data:
        summary = as_mapping(data.get("summary"))
        per_set = {name: as_mapping(summary.get(name)) for name in ("real", "fake")}
        rows = [{"set": name, "n": data.get(f"n_{name}"), **values,
                 **{f"peak_{k}": v for k, v in as_mapping(values.get("peak")).items()}}
                for name, values in per_set.items()]
        section.add(key_values([("size (px)", data.get("size")), ("fit", data.get("fit")),
                                ("colour", data.get("color")), ("high band", summary.get("high_band"))]),
                    table([Column("set", "set"), Column("n", "n"), Column("mean", "mean"),
                           Column("high_band_mean", "high-band mean"), Column("peak_fx", "peak fx", format_short),
                           Column("peak_fy", "peak fy", format_short), Column("peak_value", "peak value")], rows))
        largest = as_mapping(as_mapping(summary.get("difference")).get("largest"))
        if largest:
            section.add(paragraph(f"Largest fake-minus-real difference: {format_value(largest.get('value'))} at "
                                  f"fx = {format_short(largest.get('fx'))}, fy = {format_short(largest.get('fy'))} "
                                  "cycles/px."))
    section.add(ctx.image(section, folder / "spectra.png", "Real, fake, and fake minus real mean spectra"))
