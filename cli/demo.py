"""`patchscope demo`: the built-in pipeline on photographs shipped inside installed packages.

Registered on `cli.main`; the work is done by `analysis.demo`.
"""
from __future__ import annotations

import click

from patchscope.cli.common import dry_run_option, exit_if_dry_run, user_errors
from patchscope.cli.group import main
from patchscope.common import config as configs


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="Where the demo writes everything.")
@click.option("--quick", is_flag=True, help="The small run the tests use (under a minute on 2 CPU cores).")
@click.option("--force", is_flag=True, help="Redo every stage instead of reusing cached results.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML settings over configs/demo.yaml (mappings such as train: merge key by key).")
@dry_run_option
@user_errors
def demo(out: str, quick: bool, force: bool, config: str | None) -> None:
    """Run the paper's whole story on photographs bundled with scikit-image and scikit-learn.

    Real crops; fakes sampled from a small bundled PGAN (grown on those crops by train-gan);
    a patch classifier trained and evaluated (heatmaps, top patches); a latent shift that
    exaggerates what it sees; the PGAN finetuned to fool it; a classifier retrained on the
    finetuned PGAN; an HTML report. Ends with a table of the story's numbers. Every setting
    is in configs/demo.yaml; each stage is cached in OUT (a re-run resumes, --force redoes).

    \b
    Example:
      patchscope demo --out runs/demo
    """
    from patchscope.analysis.demo import load_demo_config, run_demo

    exit_if_dry_run(lambda: {"out": out, "force": force, "quick": quick,
                             "settings": configs.to_dict(load_demo_config(config, quick))})
    run_demo(out, quick=quick, force=force, config_path=config)


if __name__ == "__main__":
    main()
