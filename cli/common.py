"""Shared pieces of the command line: one-line user errors, option layering, --dry-run.

Used by every command module of `cli`.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys
from typing import Any, Callable

import click
import yaml

from patchscope.common import config as configs
from patchscope.common.errors import InputError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


def user_errors(fn: Callable) -> Callable:
    """Turn a user error into one line on stderr and exit code 2, without a traceback; a full disk into
    one line and exit code 1 (the input was fine; the atomic writes left the previous files whole)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            if not getattr(err, "quiet", False):  # torchrun: rank 0 printed the error the other ranks met too
                click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            where = f"{err.filename}: " if err.filename else ""
            click.echo(f"error: {where}{os.strerror(err.errno).lower()}; what was saved before is intact: free space "
                       f"and run the same command again (with --resume where it has one)", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run the same command (with --resume where it has one) to continue", err=True)
            sys.exit(130)
    return wrapper


def overrides(kwargs: dict[str, Any], drop: tuple[str, ...] = ("config",)) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in drop and v is not None}


def config_layers(config_path: str | None, section: str) -> dict[str, Any]:
    """The `section` of a --config file. A generator named there as MODULE:CALLABLE is refused: importing and
    calling it runs code, which a settings file passed around must not be able to do (give it as an option)."""
    layer = configs.read_yaml(config_path, section) if config_path else {}
    from patchscope.generators.custom import is_module_spec

    value = layer.get("generator")
    if isinstance(value, str) and is_module_spec(value):
        raise InputError(f"{config_path}: generator: {value} names code to import and run (MODULE:CALLABLE); a "
                         f"settings file may name only generator files: give it as --generator / the GENERATOR argument")
    return layer


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


GENERATOR_HELP = "file, or MODULE:CALLABLE (your own generator; see README 'Your own generator')"


def own_generator_options(command: Callable) -> Callable:
    """The options of a MODULE:CALLABLE generator, for every command that takes a generator."""
    return _stacked(command, [
        click.option("--weights", type=click.Path(dir_okay=False),
                     help="MODULE:CALLABLE only: a safetensors state dict loaded strictly into its network, e.g. the "
                          "generator.safetensors a finetune wrote."),
        click.option("--latent-dim", type=click.IntRange(1),
                     help="MODULE:CALLABLE only, when the module has no latent_dim/z_dim/nz attribute."),
        click.option("--resolution", type=click.IntRange(1),
                     help="MODULE:CALLABLE only, when the module has no resolution/img_resolution/image_size "
                          "attribute.  [default: measured with one forward pass]"),
    ])


def scoring_options(command: Callable) -> Callable:
    """How a trained classifier scores images: the options `eval` and `patches` share."""
    return _stacked(command, [
        click.option("--load-size", type=click.IntRange(1), help="[default: as trained]"),
        click.option("--crop-size", type=click.IntRange(1), help="[default: as trained]"),
        VIEW_OPTION,
        click.option("--batch-size", type=click.IntRange(1), help="[default: 64]"),
        click.option("--device", help="auto | cpu | cuda | cuda:N.  [default: auto]"),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="[default: auto]"),
        click.option("--workers", type=click.IntRange(0), help="DataLoader workers.  [default: 0]"),
        click.option("--on-bad-image", type=click.Choice(["skip", "error"]), help="[default: skip]"),
    ])


# What of each resized image a classifier scores (forensics.evaluate.view_crop_size); eval, patches and score.
VIEW_OPTION = click.option(
    "--view", type=click.Choice(["auto", "full", "crop"]),
    help="What of each image (resized to the load size) is scored. crop: the centre crop-size square; full: the "
         "whole resized image (its centred load-size square); auto: full for patch classifiers, as the public "
         "code scores them, crop for full-image baselines (one output for the whole input) and when no load "
         "size is set.  [default: auto]")


def _stacked(command: Callable, options: list[Callable]) -> Callable:
    """`command` with `options` applied so that --help lists them in this order."""
    for option in reversed(options):
        command = option(command)
    return command


DRY_RUN = "patchscope.dry_run"  # key of the flag in click's Context.meta, read by exit_if_dry_run


def dry_run_option(command: Callable | None = None, *, arguments: bool = False) -> Callable:
    """Add --dry-run: print the resolved settings as YAML and exit 0, creating and writing nothing.

    A command with a settings dataclass calls `exit_if_dry_run(cfg)` once it has resolved it
    (defaults < --config < flags) and before any work, so the YAML is what config.yaml would hold.
    With `arguments=True`, for commands without one, the decorator prints the command's resolved
    arguments itself and never calls it. Place it right above @user_errors.
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, dry_run: bool = False, **kwargs: Any) -> Any:
            if dry_run and arguments:
                _print_settings(kwargs)
                click.get_current_context().exit(0)
            click.get_current_context().meta[DRY_RUN] = dry_run
            return fn(*args, **kwargs)
        return click.option("--dry-run", is_flag=True,
                            help="Print the resolved settings as YAML and exit without writing anything.")(wrapper)
    return decorate(command) if command is not None else decorate


def exit_if_dry_run(settings: Any) -> None:
    """Under --dry-run, print `settings` (a dataclass, a mapping, or a function returning one, called only
    then) as YAML and exit 0; otherwise return and let the command do its work."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not ctx.meta.get(DRY_RUN):
        return
    _print_settings(settings() if callable(settings) else settings)
    ctx.exit(0)


def _print_settings(settings: Any) -> None:
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        click.echo(configs.to_yaml(settings), nl=False)
    else:
        click.echo(yaml.safe_dump(_plain(settings), sort_keys=False), nl=False)


def _plain(value: Any) -> Any:
    """What yaml.safe_dump can write: tuples (multiple options, nargs) as lists, paths as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
