"""The jobs' configuration files: YAML defaults, an environment file and command-line overrides.

``jobs/runtime/base.yaml`` (linked from ``conf/base.yaml``) holds every default; an environment file
(``conf/local.yaml``, ``conf/cluster.yaml``, ``conf/databricks.yaml``) overrides some of them, and
``--set section.key=value`` overrides win over both. The merged tree becomes typed settings in
``jobs.runtime.settings``, which refuses anything unknown or out of range.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jobs.runtime.errors import ConfigError
from jobs.runtime.settings import Config, settings_from_tree

# The defaults ship inside the package (a zip for --py-files, a wheel on Databricks); in the
# repository conf/base.yaml links to them.
DEFAULTS = resources.files("jobs.runtime").joinpath("base.yaml")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The defaults, then ``path`` over them, then ``key.path=value`` overrides."""
    tree = _parse_yaml(DEFAULTS.read_text(), "jobs/runtime/base.yaml")
    if path is not None and Path(path).resolve() != Path(str(DEFAULTS)).resolve():
        tree = _merge(tree, _read_yaml(Path(path)))
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        tree = _merge(tree, _nested(_override_path(key.split(".")), yaml.safe_load(raw) if raw else None, tree))
    return settings_from_tree(tree)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, name: str) -> dict:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {name!r} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {name!r} must hold a mapping at the top level")
    return loaded


def _merge(base: Any, overlay: Any) -> Any:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    return overlay


def _override_path(parts: list[str]) -> list[str]:
    """The override's key split along the settings tree: a mapping's own keys may contain dots."""
    kind: Any = Config
    for position, part in enumerate(parts):
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(argument for argument in typing.get_args(kind) if argument is not type(None))
        if dataclasses.is_dataclass(kind):
            kind = typing.get_type_hints(kind).get(part)
        elif typing.get_origin(kind) is tuple:
            kind = typing.get_args(kind)[0]
        elif typing.get_origin(kind) is Mapping:
            return [*parts[:position], ".".join(parts[position:])]
        else:
            break
    return parts


def _nested(path: list[str], value: Any, tree: Any) -> Any:
    """An overlay setting ``path`` to ``value``; list items are addressed by index or by their ``name``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    current = tree.get(head) if isinstance(tree, dict) else None
    if isinstance(current, list) and rest:
        index = _list_index(current, head, rest)
        items = list(current)
        items[index] = _merge(items[index], _nested(rest[1:], value, items[index]))
        return {head: items}
    return {head: _nested(rest, value, current)}


def _list_index(items: list, head: str, rest: list[str]) -> int:
    selector = rest[0]
    if selector.isdigit() and int(selector) < len(items):
        return int(selector)
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == selector:
            return index
    raise ConfigError(f"config key {head!r} has no item {selector!r}")
