"""Shared pieces of the command line: one-line user errors, option layering.

Used by every command module of `cli`.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from patchscope.forensics import config as configs
from patchscope.common.errors import InputError

def user_errors(fn: Callable) -> Callable:
    """Turn a user error into one line on stderr and exit code 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run the same command (with --resume where it has one) to continue", err=True)
            sys.exit(130)
    return wrapper


def overrides(kwargs: dict[str, Any], drop: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in drop and v is not None}


def config_layers(config_path: str | None, section: str) -> dict[str, Any]:
    return configs.read_yaml(config_path, section) if config_path else {}


def lpips_options(command: Callable) -> Callable:
    """The LPIPS options every command that measures perceptual distance takes."""
    options = [
        click.option("--lpips-net", type=click.Choice(["alex", "vgg", "squeeze"]),
                     help="LPIPS backbone.  [default: alex]"),
        click.option("--lpips-weights", type=click.Path(dir_okay=False),
                     help="torchvision weights of the LPIPS backbone (alexnet-owt-7be5be79.pth, vgg16-397923af.pth "
                          "or squeezenet1_1-b8a52dc0.pth).  [default: $TORCH_HOME/hub/checkpoints]"),
        click.option("--lpips-random/--no-lpips-random", default=None,
                     help="Random LPIPS backbone: smoke tests only, its distances are not perceptual.  [default: off]"),
    ]
    return _stacked(command, options)


def scoring_options(command: Callable) -> Callable:
    """How a trained classifier scores images: the options `eval` and `patches` share."""
    return _stacked(command, [
        click.option("--load-size", type=click.IntRange(1), help="[default: as trained]"),
        click.option("--crop-size", type=click.IntRange(1), help="[default: as trained]"),
        click.option("--batch-size", type=click.IntRange(1), help="[default: 64]"),
        click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]"),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]"),
        click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0]"),
        click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="[default: skip]"),
    ])


def _stacked(command: Callable, options: list[Callable]) -> Callable:
    """`command` with `options` applied so that --help lists them in this order."""
    for option in reversed(options):
        command = option(command)
    return command
