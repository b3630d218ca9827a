"""The `patchscope` click group and its global options; the command modules register on it.

Kept apart from `cli/__init__.py`, which imports the command modules, so no import cycle.
"""
from __future__ import annotations

import logging
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--threads", type=click.IntRange(1),
              help="CPU threads torch uses (intra-op, and inter-op while it can still be set).  "
                   "[default: torch's, usually one per core]")
def main(verbose: bool, threads: int | None) -> None:
    """patchscope: what makes fake face images detectable.

    Every command takes --dry-run: it prints the resolved settings (defaults < --config < flags)
    as YAML and exits without writing anything.

    \b
    Examples:
      patchscope demo --out runs/demo
      patchscope train --real data/real --fake data/fake --out runs/xb2 --model xception_block2
      patchscope eval runs/xb2 --test pgan=data/real,data/fake --test sg=data/real,data/sg
      patchscope --threads 4 train --config configs/paper_xception_block2.yaml --out runs/xb2 --dry-run
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    if threads is not None:
        from patchscope.common.device import set_threads  # torch only when asked: --help stays fast

        set_threads(threads)
