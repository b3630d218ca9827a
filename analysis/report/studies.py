"""Run report sections of the attack studies: latent exaggeration, generator finetuning, and retraining
(old vs retrained classifier). Used by `analysis.report`; the classifier stages are in `analysis.report.sections`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from patchscope.analysis.report.curves import FINETUNE_PANELS, SHIFT_PANELS
from patchscope.analysis.report.glossary import terms_note
from patchscope.analysis.report.html import Column, format_short, format_value, heading, key_values, paragraph, preformatted, table
from patchscope.analysis.report.sections import METRIC_COLUMNS, ReportContext, Section, as_mapping
from patchscope.analysis.residual import SET_NAMES, WHO
from patchscope.common.errors import InputError
from patchscope.common.userfiles import read_regular

MAX_SUMMARY_BYTES = 1 << 20  # a summary is a few lines; a huge or endless file is named, not read


def build_exaggerate(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("A latent shift w learned to make the classifier call samples fake (eq. 3); samples G(z - k*w) "
                       "for held-out latents: k > 0 more fake, k < 0 less fake, k = 0 the original.")
    shift = as_mapping(ctx.json(folder / "shift.json", section))
    if shift:
        section.add(key_values([("latent space", shift.get("space")),
                                ("classifier model", shift.get("classifier_model")),
                                ("lambda (LPIPS weight)", shift.get("lam")), ("steps", shift.get("steps")),
                                ("batch size", shift.get("batch_size")), ("learning rate", shift.get("lr")),
                                ("LPIPS", shift.get("lpips")), ("held-out seed", shift.get("eval_seed")),
                                ("held-out latents", shift.get("eval_n"))], format_short))
    metrics = as_mapping(ctx.json(folder / "metrics.json", section))
    rows = [as_mapping(r) for r in metrics.get("rows") or []]
    if rows:
        section.add(heading(3, "Per k, on held-out latents"), table(
            [Column("k", "k", format_short), Column("n", "n"), Column("p_fake", "mean P(fake)"),
             Column("p_fake_std", "std"), Column("lpips", "mean LPIPS to k = 0"), Column("lpips_std", "std")],
            rows, highlight=lambda row: row.get("k") == 0),
                    terms_note("k", "n", "P(fake)", "LPIPS", "lambda (LPIPS weight)"))
    grid = ctx.image(section, folder / "grid.png", "Rows: held-out samples; columns: k; captions: P(fake)",
                     pixels=True)
    if grid:
        section.add(heading(3, "Exaggeration grid"), grid)
    section.add(heading(3, "Fitting the shift"))
    ctx.log_curves(section, folder, SHIFT_PANELS, "Shift optimisation",
                   caption="Per Adam step, before its update: the loss, the classifier term, P(fake) of the moved "
                           "samples and their LPIPS distance to the originals")
    section.add(ctx.config(section, folder))


def build_finetune(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("The generator finetuned to fool the frozen classifier while a discriminator keeps it realistic "
                       "(eq. 4); the same held-out latents through the original and the finetuned generator.")
    data = as_mapping(ctx.json(folder / "before_after.json", section))
    if data:
        section.add(key_values([("steps", data.get("steps")), ("stopped early", data.get("stopped") or "no"),
                                ("aggregation", data.get("aggregation")), ("held-out seed", data.get("eval_seed")),
                                ("real images judged", data.get("n_real")), ("LPIPS", data.get("lpips"))]))
        rows = [as_mapping(r) for r in data.get("rows") or []]
        section.add(heading(3, "Classifier before and after"), table(
            [Column("generator", "generator"), *METRIC_COLUMNS, Column("p_fake", "mean P(fake)"),
             Column("lpips_to_original", "LPIPS to original"), Column("n_fake", "n fake"), Column("n_real", "n real")],
            rows), terms_note("AP", "AP (real+)", "ROC AUC", "acc", "acc real", "acc fake", "P(fake)", "LPIPS"))
        change = as_mapping(data.get("change"))
        if change:
            section.add(paragraph("Change, finetuned minus original: " +
                                  ", ".join(f"{k} {format_value(v)}" for k, v in change.items())))
    grid = ctx.image(section, folder / "grid.png", "Same latents: original (framed) vs finetuned; captions: P(fake)",
                     pixels=True)
    if grid:
        section.add(heading(3, "Original vs finetuned samples"), grid)
    section.add(heading(3, "Finetuning log"))
    ctx.log_curves(section, folder, FINETUNE_PANELS, "Finetuning",
                   caption="Per logged step: mean losses since the last line, and the classifier's accuracy, AP and "
                           "P(fake) on fresh samples of the averaged generator against real images")
    section.add(ctx.config(section, folder))


def _comparison_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"classifier": WHO.get(who, who), "test_set": SET_NAMES.get(name, name), **as_mapping(values)}
            for who, per_set in metrics.items() for name, values in as_mapping(per_set).items()]


COMPARISON_COLUMNS = (Column("classifier", "classifier"), Column("test_set", "test fakes"), *METRIC_COLUMNS,
                      Column("n", "n"))


def build_retrain_study(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("What stays detectable after finetuning: the old classifier and one retrained on the finetuned "
                       "generator's fakes, on original and finetuned fakes (same reals), and the semantic classes of "
                       "their most predictive patches.")
    comparison = as_mapping(ctx.json(folder / "comparison.json", section))
    if comparison:
        patches = as_mapping(comparison.get("patches"))
        section.add(key_values([("aggregation", comparison.get("aggregation")), ("split", comparison.get("split")),
                                ("finetuned generator", comparison.get("generator")),
                                ("segmenter", patches.get("segmenter")), ("patches per class", patches.get("n"))]),
                    table(COMPARISON_COLUMNS, _comparison_rows(as_mapping(comparison.get("metrics")))))
    section.add(ctx.image(section, folder / "comparison.png",
                          "Left: AP and accuracy of old vs retrained classifier; right: classes of their most "
                          "predictive patches vs random patches (n = patches counted: N old, N retrained, N random)"),
                terms_note("AP", "AP (real+)", "ROC AUC", "acc", "acc real", "acc fake", "most predictive", "random"))
    summary = folder / "summary.txt"
    if summary.is_file():
        try:
            text = read_regular(summary, "a retrain study's summary.txt", MAX_SUMMARY_BYTES).decode("utf-8")
            section.add(heading(3, "Summary"), preformatted(text))
        except (OSError, ValueError, InputError) as err:
            section.notes.append(f"{ctx.where(summary)}: unreadable ({type(err).__name__})")
    section.add(ctx.config(section, folder))


def build_retrain(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = "Old and retrained classifier scored on fakes of the original and of the finetuned generator."
    data = as_mapping(ctx.json(folder / "metrics.json", section))
    if data:
        section.add(key_values([("aggregation", data.get("aggregation")), ("split", data.get("split")),
                                ("retrained classifier", data.get("classifier"))]),
                    table(COMPARISON_COLUMNS, _comparison_rows(as_mapping(data.get("metrics")))))
    section.add(ctx.config(section, folder))


def build_demo_summary(folder: Path, ctx: ReportContext, section: Section) -> None:
    section.caption = ("The demo's story in numbers: the patch classifier on the original generator, the same frozen "
                       "classifier on the finetuned generator, a classifier retrained on the finetuned generator, "
                       "and P(fake) of samples moved along the learned exaggeration shift.")
    data = as_mapping(ctx.json(folder / "demo_summary.json", section))
    rows = [as_mapping(r) for r in data.get("rows") or []]
    if rows:
        section.add(key_values([(r.get("name"), r.get("value")) for r in rows]))
    stages = as_mapping(data.get("stages"))
    if stages:
        section.add(heading(3, "Stages"), table([Column("stage", "stage"), Column("seconds", "seconds", format_short)],
                                                [{"stage": k, "seconds": v} for k, v in stages.items()]))
    for note in data.get("notes") or []:
        section.notes.append(str(note))
