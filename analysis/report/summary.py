"""The report's first table: the key numbers of every study the folder holds, each row linking to its section.

Rows, only for what is there: per evaluation and test set the AP and accuracy under the evaluation's image score
(aggregation); the exaggeration's range of mean P(fake) over k; the frozen classifier's AP and accuracy before ->
after finetuning; the old and the retrained classifier on the finetuned generator's fakes. Evaluations inside a
retraining folder are left to its row. A demo folder has its own summary (`studies.build_demo_summary`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from patchscope.analysis.report.glossary import terms_note
from patchscope.analysis.report.html import escape, format_short, format_value, paragraph
from patchscope.analysis.report.sections import ReportContext, as_mapping

RETRAIN_STAGES = ("Retrain study", "Retraining")


@dataclass(frozen=True)
class Found:
    """A section of the page: its stage title, folder, anchor and the name its heading shows."""

    stage: str
    folder: Path
    anchor: str
    name: str


@dataclass(frozen=True)
class Row:
    found: Found
    measured_on: str
    score: Any = None        # the aggregation (image score) the numbers use
    ap: str = ""
    acc: str = ""
    span: str = ""           # one text over the AP and accuracy columns (exaggeration)


def _arrow(before: Any, after: Any) -> str:
    return f"{format_value(before)} → {format_value(after)}"


def _evaluation(found: Found, ctx: ReportContext) -> list[Row]:
    data = as_mapping(ctx.json(found.folder / "metrics.json"))
    chosen = data.get("aggregation")
    rows = []
    for name, per_mode in as_mapping(data.get("results")).items():
        m = as_mapping(as_mapping(per_mode).get(chosen))
        if m:
            rows.append(Row(found, f"test set {name} ({format_value(m.get('n_real'))} real, "
                                   f"{format_value(m.get('n_fake'))} fake)", chosen,
                            format_value(m.get("ap")), format_value(m.get("acc"))))
    return rows


def _exaggeration(found: Found, ctx: ReportContext) -> list[Row]:
    data = as_mapping(ctx.json(found.folder / "metrics.json"))
    rows = [as_mapping(r) for r in data.get("rows") or []]
    rows = [r for r in rows if isinstance(r.get("k"), (int, float)) and isinstance(r.get("p_fake"), (int, float))]
    if not rows:
        return []
    low, high = min(rows, key=lambda r: r["p_fake"]), max(rows, key=lambda r: r["p_fake"])
    ks = sorted(r["k"] for r in rows)
    return [Row(found, f"held-out samples G(z - k*w), k = {format_short(ks[0])} ... {format_short(ks[-1])}, "
                       f"{format_value(rows[0].get('n'))} per k", data.get("aggregation"),
                span=f"mean P(fake) from {format_value(low['p_fake'])} (k = {format_short(low['k'])}) "
                     f"to {format_value(high['p_fake'])} (k = {format_short(high['k'])})")]


def _finetuning(found: Found, ctx: ReportContext) -> list[Row]:
    data = as_mapping(ctx.json(found.folder / "before_after.json"))
    rows = {as_mapping(r).get("generator"): as_mapping(r) for r in data.get("rows") or []}
    before, after = rows.get("original"), rows.get("finetuned")
    if not before or not after:
        return []
    return [Row(found, f"the frozen classifier on fresh samples of the original → finetuned generator "
                       f"(+ {format_value(data.get('n_real'))} reals)", data.get("aggregation"),
                _arrow(before.get("ap"), after.get("ap")), _arrow(before.get("acc"), after.get("acc")))]


def _retraining(found: Found, ctx: ReportContext) -> list[Row]:
    name = "comparison.json" if found.stage == "Retrain study" else "metrics.json"
    data = as_mapping(ctx.json(found.folder / name))
    metrics = as_mapping(data.get("metrics"))
    rows = []
    for who, text in (("old", "old classifier"), ("new", "retrained classifier")):
        m = as_mapping(as_mapping(metrics.get(who)).get("finetuned"))
        if m:
            rows.append(Row(found, f"{text} on the finetuned generator's fakes (n {format_value(m.get('n'))})",
                            data.get("aggregation"), format_value(m.get("ap")), format_value(m.get("acc"))))
    return rows


ROWS = {"Evaluation": _evaluation, "Exaggeration": _exaggeration, "Finetuning": _finetuning,
        "Retrain study": _retraining, "Retraining": _retraining}


def summary_rows(found: Sequence[Found], ctx: ReportContext) -> list[Row]:
    retrain_folders = [f.folder for f in found if f.stage in RETRAIN_STAGES]
    rows: list[Row] = []
    for item in found:
        if item.stage == "Evaluation" and any(r in item.folder.parents for r in retrain_folders):
            continue
        builder = ROWS.get(item.stage)
        if builder is not None:
            try:
                rows += builder(item, ctx)
            except (KeyError, TypeError, AttributeError, ValueError):
                continue  # its own section says what is wrong with its files
    return rows


def _row_html(row: Row) -> str:
    link = f'<a href="#{escape(row.found.anchor)}">{escape(row.found.name)}</a>'
    score = escape(row.score) if row.score else "n/a"
    numbers = (f'<td colspan="2">{escape(row.span)}</td>' if row.span else
               f'<td class="num">{escape(row.ap)}</td><td class="num">{escape(row.acc)}</td>')
    measured = escape(row.measured_on)
    return (f'<tr><td>{link}</td><td class="name" title="{measured}">{measured}</td><td>{score}</td>'
            f"{numbers}</tr>")


def render_summary(found: Sequence[Found], ctx: ReportContext) -> str:
    """The key-numbers block (heading, table, terms), or "" when no study with such numbers is present."""
    rows = summary_rows(found, ctx)
    if not rows:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in ("section", "measured on", "image score", "AP", "accuracy"))
    body = "".join(_row_html(row) for row in rows)
    scores = sorted({str(row.score) for row in rows if row.score})
    return "\n".join([
        '<section id="section-summary">', "<h2>Key numbers</h2>",
        paragraph("The headline number of every study in this folder; each row links to its section. AP: average "
                  "precision, fake as the positive class; accuracy: at P(fake) = 0.5; image score: how the patch "
                  "predictions of an image make one score (before → after: the same classifier on the original and "
                  "the finetuned generator)."),
        f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
        terms_note(*scores, *(("k", "P(fake)") if any(row.span for row in rows) else ())), "</section>"])
