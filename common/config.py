"""Experiment settings as dataclasses: defaults, then a YAML file, then command-line overrides.

Used by every command and the GAN trainer; the resolved settings are saved as `config.yaml` beside each result.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, TypeVar

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
    """A dataclass config, or a plain mapping of settings, as the YAML that `read_yaml` reads back."""
    return yaml.safe_dump(to_dict(config) if dataclasses.is_dataclass(config) else dict(config), sort_keys=False)
