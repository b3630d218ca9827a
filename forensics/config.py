"""Experiment settings as dataclasses: defaults, then a YAML file, then command-line overrides.

Used by every command; the resolved settings are saved as `config.yaml` beside each result.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Collection, Mapping, TypeVar

import yaml

from patchscope.common.errors import InputError

T = TypeVar("T")


def read_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file, or its `section` sub-mapping when the file has one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    if section is not None and isinstance(data.get(section), dict):
        data = data[section]
    return data


def resolve(cls: type[T], *layers: Mapping[str, Any] | None, source: str = "settings") -> T:
    """Build `cls` from its defaults updated by each layer in turn; `None` values are skipped."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            key = key.replace("-", "_")
            if key not in fields:
                raise InputError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(fields))}")
            if value is not None:
                values[key] = value
    try:
        return cls(**values)
    except TypeError as err:
        raise InputError(f"{source}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def check_run_folder(config: Any, out: str | Path, *, holds: str, folder: str, resumable: Collection[str],
                     resume: bool, force: bool = False, resume_to: str = "continue it",
                     force_to: str | None = "start again") -> None:
    """Refuse `out` when it holds other results (files but no config.yaml), or a run of this kind unless
    `resume` (with the saved settings, those in `resumable` aside) or `force`; `force_to=None`: no --force.

    `holds` and `folder` name the run in messages ("an exaggeration", "an exaggeration folder").
    """
    out = Path(out)
    saved = out / "config.yaml"
    if not saved.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"{out}: exists and is not {folder} (no config.yaml); choose a new --out")
        return
    if force:
        return
    force_hint = f"--force to {force_to}, " if force_to else ""
    if not resume:
        raise InputError(f"{out}: already holds {holds}; pass --resume to {resume_to}, {force_hint}"
                         f"or choose another --out")
    old = read_yaml(saved)
    changed = [k for k, v in to_dict(config).items() if k not in resumable and old.get(k) != v]
    if changed:
        raise InputError(f"{out}: cannot resume with different {', '.join(changed)} "
                         f"(saved: {', '.join(f'{k}={old.get(k)!r}' for k in changed)})"
                         + (f"; pass --force to {force_to}" if force_to else ""))
