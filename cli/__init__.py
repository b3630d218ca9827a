"""The `patchscope` command line: a thin click layer over the library.

Each subcommand parses options (defaults < --config YAML < command line), calls one library
function and prints; user errors become one line on stderr and exit code 2. Commands live
in one module per floor of the library and register themselves on `main`.
"""
from __future__ import annotations

import logging
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """patchscope: what makes fake face images detectable.

    \b
    Examples:
      patchscope demo --out runs/demo
      patchscope train --real data/real --fake data/fake --out runs/xb2 --model xception_block2
      patchscope eval runs/xb2 --test pgan=data/real,data/fake --test sg=data/real,data/sg
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)


from patchscope.cli import attack, classifier, demo, generation  # noqa: E402,F401 - registers the commands
