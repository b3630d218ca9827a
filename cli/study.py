"""`patchscope study`: a generalisation study (models x training sets x test sets) from one YAML file.

Registered on `cli.main`; the work is done by `analysis.study`.
"""
from __future__ import annotations

import click

from patchscope.cli.common import dry_run_option, exit_if_dry_run, user_errors
from patchscope.cli.group import main


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", required=True,
              help="Study folder: runs/MODEL__TRAINSET/ (each run, its eval/TEST/), study.json, table.md/.csv/.tex. "
                   "Run the same command again to continue a study that stopped.")
@dry_run_option
@user_errors
def study(config: str, out: str) -> None:
    """Train every model of CONFIG on every training set, evaluate each on every test set, build the table.

    \b
    CONFIG is YAML: a `study:` section with `models:` (row name -> train
    settings, e.g. {model: xception_block2, patience: 20}), `train_sets:`
    (name -> {real: PATH, fake: PATH}) and `test_sets:` (name -> {real, fake,
    split}), plus shared `train:`, `eval:` and `table:` settings; relative
    paths are read from the current folder. The whole file is checked first.
    Each run is trained in OUT/runs/MODEL__TRAINSET (a run cut short resumes
    from its last epoch; a finished one is kept), then scored on each test set
    in its eval/TEST (kept while its settings and checkpoint are unchanged).
    OUT/study.json records every step; OUT/table.{md,csv,tex} is the table:
    a row per run, a column per test set, AP and accuracy in percent.
    --dry-run prints the resolved study, missing data and the steps to do.

    \b
    Example:
      patchscope study configs/paper_celebahq_pgan.yaml --out runs/table1 --dry-run
      patchscope study configs/paper_celebahq_pgan.yaml --out runs/table1
    """
    from patchscope.analysis.study import describe, load_study, run_study

    loaded = load_study(config)
    exit_if_dry_run(lambda: describe(loaded, out))
    result = run_study(loaded, out, echo=click.echo)
    click.echo("\n" + result["markdown"], nl=False)
    for path in result["files"]:
        click.echo(f"table: {path}")
    click.echo(f"record: {result['out']}/study.json")
