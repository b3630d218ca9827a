"""The `patchscope` click group and its global options; the command modules register on it.

Kept apart from `cli/__init__.py`, which imports the command modules, so no import cycle.
"""
from __future__ import annotations

import logging
import os
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
    if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        _under_torchrun(click.get_current_context())


# Commands that share their work among the processes torchrun starts; any other runs on rank 0 alone.
SHARDED = ("train", "eval", "sample", "exaggerate", "finetune", "retrain")


def _under_torchrun(ctx: click.Context) -> None:
    """Ranks other than 0 log warnings only and print nothing; a command that is not sharded runs on rank 0 as a
    single process while the others wait at a barrier, then exit 0."""
    from patchscope.common import distributed

    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout = ctx.with_resource(open(os.devnull, "w"))
    command = ctx.invoked_subcommand
    if command is None or command in SHARDED:
        return
    if not distributed.wait_for_main(command):
        ctx.exit(0)
    ctx.call_on_close(distributed.release_others)
    ctx.with_resource(distributed.alone())
