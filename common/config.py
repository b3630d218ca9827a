"""Experiment settings as dataclasses: defaults, then a YAML file, then command-line overrides.

Used by every command and the GAN trainer; the resolved settings are saved as `config.yaml` beside each result.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from patchscope.common.errors import InputError
from patchscope.common.userfiles import read_regular

T = TypeVar("T")

# Settings files are a few kB of plain keys. These bounds refuse a YAML "billion laughs" (aliases of
# aliases, expanded later by dataclasses.asdict) and documents deep enough to exhaust the recursion limit.
MAX_YAML_BYTES = 4 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000   # counted with every alias expanded
MAX_YAML_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with more than MAX_YAML_ALIASES aliases while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise ValueError(f"more than {MAX_YAML_ALIASES} aliases")
        return super().compose_node(parent, index)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion (aliases copied out) is too large, too deep or cyclic.

    Sizes and depths are memoised per node, so a graph of shared aliases is walked once, not expanded.
    """
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()  # entered, not yet left: the current path, for cycles
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            open_nodes.discard(id(node))
            children = [sizes[id(child)] for child in _children(node)]
            size = 1 + sum(s for s, _ in children)
            depth = 1 + max((d for _, d in children), default=0)
            if size > MAX_YAML_NODES:
                raise ValueError(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            sizes[id(node)] = (size, depth)
        elif id(node) in open_nodes:
            raise ValueError("an alias refers to a node that contains it")
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def _parse_bounded(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file, or its `section` sub-mapping when the file has one."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    raw = read_regular(path, "a YAML settings file", MAX_YAML_BYTES)
    try:
        data = _parse_bounded(raw.decode("utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except RecursionError:
        raise InputError(f"{path}: YAML nested too deeply for a settings file") from None
    except ValueError as err:
        raise InputError(f"{path}: refused as a settings file ({err})") from None
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
