"""Result commands: score (P(fake) of unlabelled images) and table (paper-style tables of eval results).

Registered on `cli.main`; each calls one function of `analysis`.
"""
from __future__ import annotations

from typing import Any

import click

from patchscope.cli.common import VIEW_OPTION, config_layers, dry_run_option, exit_if_dry_run, overrides, user_errors
from patchscope.cli.group import main
from patchscope.common import config as configs


@main.command()
@click.argument("run")
@click.argument("images", nargs=-1)
@click.option("--config", type=click.Path(dir_okay=False), help="YAML settings (its `score:` section, or the whole file).")
@click.option("--out", help="Folder for scores.csv and scores.json.  [default: none: print only]")
@click.option("--csv", "csv_path", help="Write the CSV here instead (path, after_softmax, before_softmax, vote).")
@click.option("--json", "json_path", help="Write the JSON here instead (settings, means, skipped files, every image).")
@click.option("--heatmaps", help="Folder for one heatmap card per image and heatmaps.html.  [default: none]")
@click.option("--which", type=click.Choice(["best", "last"]), help="Checkpoint of a run directory.  [default: best]")
@click.option("--split", help="Only this split of folders with train/val/test subfolders and of manifests "
                              "with a split column.  [default: every image]")
@click.option("--load-size", type=click.IntRange(1), help="[default: as trained]")
@click.option("--crop-size", type=click.IntRange(1), help="[default: as trained]")
@VIEW_OPTION
@click.option("--batch-size", type=click.IntRange(1), help="[default: 64]")
@click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0]")
@click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="Unreadable images.  [default: skip]")
@click.option("--force", is_flag=True, default=None, help="Replace existing score files and heatmaps.html.")
@dry_run_option
@user_errors
def score(run: str, images: tuple[str, ...], config: str | None, csv_path: str | None, json_path: str | None,
          **options: Any) -> None:
    """Score unlabelled images with a trained classifier: P(fake) per image.

    \b
    IMAGES are image files, folders (every image below them) and .txt/.csv
    manifests. Each image goes through what eval does to a test set (the run's
    load and crop sizes, the same --view), so it gets the score eval gives it,
    under every aggregation: after_softmax (mean patch P(fake), the paper's),
    before_softmax and vote. Prints the first rows, the count and the mean;
    writes CSV and JSON with --out, --csv or --json. Unreadable files are
    skipped and named in one warning (--on-bad-image error stops instead).

    \b
    Example:
      patchscope score runs/xb2 photos/ --out runs/xb2/scores
      patchscope score runs/xb2 a.png b.jpg list.txt --csv scores.csv --heatmaps runs/xb2/score_heatmaps
    """
    from patchscope.analysis.score_images import run_score
    from patchscope.forensics.score_images import ScoreConfig, format_scores

    cli = {**overrides(options), "run": run, "csv": csv_path, "json": json_path,
           **({"inputs": list(images)} if images else {})}
    cfg = configs.resolve(ScoreConfig, config_layers(config, "score"), overrides(cli), source=config or "options")
    exit_if_dry_run(cfg)
    summary = run_score(cfg, progress=True)
    click.echo(format_scores(summary["result"]))
    for kind, path in summary["files"].items():
        click.echo(f"{kind}: {path}")
    if summary["heatmaps"]:
        click.echo(f"heatmaps: {summary['heatmaps']}")


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option("--metric", type=click.Choice(["ap", "acc", "both"]), default="both", show_default=True,
              help="Values in each test set's cells (percent).")
@click.option("--aggregation", type=click.Choice(["after_softmax", "before_softmax", "vote"]),
              default="after_softmax", show_default=True, help="Image score behind the values (named in the caption).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex", "all"]), default="md", show_default=True,
              help="Markdown, CSV, LaTeX, or all three.")
@click.option("--out", help="File name prefix: writes PREFIX.md, PREFIX.csv, PREFIX.tex.  [default: print]")
@click.option("--rows", help="Row names, comma-separated: their order, and only these.  [default: all, in order given]")
@click.option("--columns", help="Test sets, comma-separated: their order, and only these.  "
                                "[default: all, by first appearance]")
@click.option("--digits", type=click.IntRange(0, 6), default=1, show_default=True, help="Decimals of the percentages.")
@dry_run_option(arguments=True)
@user_errors
def table(results: tuple[str, ...], metric: str, aggregation: str, fmt: str, out: str | None,
          rows: str | None, columns: str | None, digits: int) -> None:
    """Paper-style table of eval results: a row per run, a column per test set.

    \b
    RESULTS are metrics.json files written by `patchscope eval`, folders
    holding them (searched below, e.g. runs/ for runs/*/eval/metrics.json),
    or NAME=PATH to name a row. Rows are named after the classifier run
    eval recorded. Cells are AP and accuracy in percent under one
    aggregation (named in the caption); the best of each column is bold
    (CSV: listed in the `best` column); a missing value is "–" (CSV: empty).

    \b
    Example:
      patchscope table runs/ --format all --out tables/results
      patchscope table xb1=runs/xb1/eval xb2=runs/xb2/eval --metric ap --columns pgan,sg --format latex
    """
    from patchscope.analysis.tables import FORMATS, RENDERERS, build_table, load_results, write_tables

    split = lambda text: [part.strip() for part in text.split(",") if part.strip()] if text else None  # noqa: E731
    built = build_table(load_results(results), metric=metric, aggregation=aggregation, rows=split(rows),
                        columns=split(columns), digits=digits)
    formats = list(FORMATS) if fmt == "all" else [fmt]
    if out:
        for path in write_tables(built, formats, out):
            click.echo(f"table: {path}")
    else:
        click.echo("\n".join(RENDERERS[f](built) for f in formats), nl=False)
