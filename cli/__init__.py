"""The `patchscope` command line: a thin click layer over the library.

Each subcommand parses options (defaults < --config YAML < command line), calls one library
function and prints; user errors become one line on stderr and exit code 2. Commands live
in one module per floor of the library and register themselves on `main` (`cli.group`).
"""
from patchscope.cli import attack, classifier, demo, generation, importing, score, study  # noqa: F401 - registers the commands
from patchscope.cli.group import main

__all__ = ["main"]
