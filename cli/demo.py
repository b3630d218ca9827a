"""`patchscope demo`: the built-in pipeline on photographs shipped inside installed packages.

Registered on `cli.main`; the work is done by `analysis.demo`.
"""
from __future__ import annotations

import click

from cli import main
from cli.common import user_errors


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="Where the demo writes everything.")
@click.option("--quick", is_flag=True, help="A smaller run for tests (about a minute).")
@click.option("--force", is_flag=True, help="Redo every stage instead of reusing cached results.")
@click.option("--config", type=click.Path(dir_okay=False), help="Demo settings.  [default: configs/demo.yaml]")
@user_errors
def demo(out: str, quick: bool, force: bool, config: str | None) -> None:
    """Run the built-in demo: real photographs, fakes, train, evaluate, print AP.

    \b
    Example:
      patchscope demo --out runs/demo
    """
    from analysis.demo import run_demo

    run_demo(out, quick=quick, force=force, config_path=config)


if __name__ == "__main__":
    main()
