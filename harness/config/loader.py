"""The one YAML loader: a file (and dotted command-line overrides) into a validated, frozen config type.

Run files (:func:`load_config`), the head sweep's, the baseline's and the heads verb's job files all pass through
:func:`load_yaml`: unknown keys, ill-typed values and impossible settings are refused with one
:class:`~harness.config.errors.ConfigError` naming every bad key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from harness.config.errors import ConfigError
from harness.config.messages import problems_of
from harness.config.schema import RunConfig

T = TypeVar("T")


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree or {}


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{dotted_key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr=1e-4", "--data.augment.enabled", "true"]`` -> nested dict of YAML-typed values."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        if "=" in arg:
            dotted_key, raw = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            dotted_key, raw = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg!r} has no value")
        if "." not in dotted_key:
            raise ConfigError(f"override --{dotted_key}: expected --section.key (e.g. --train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override --{dotted_key}: not a YAML value ({' '.join(str(error).split())})") from None
        _set_dotted(tree, dotted_key, value)
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` laid over ``base``, section by section."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate(cls: type[T], tree: Any, source: str = "") -> T:
    """``tree`` (plain YAML values) as ``cls``; every bad key in one ConfigError, prefixed by ``source``."""
    try:
        return TypeAdapter(cls).validate_python(tree)
    except ValidationError as error:
        problems = problems_of(error, cls)
        prefix = f"{source}: " if source else ""
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise ConfigError(prefix + count + "; ".join(problems)) from None


def load_yaml(path: str | os.PathLike | None, cls: type[T], overrides: list[str] | None = None,
              what: str = "config file") -> T:
    """Read a YAML file (None: the type's defaults), lay the dotted overrides over it, validate it as ``cls``."""
    tree = read_yaml(path, what) if path is not None else {}
    tree = merge(tree, parse_overrides(overrides or []))
    return validate(cls, tree, str(path) if path is not None else "defaults")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or the defaults when ``path`` is None) and apply dotted overrides."""
    return load_yaml(path, RunConfig, overrides)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) suitable for YAML, JSON and MLflow params."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}`` for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", to_dict(config))
    return flat


def dump_yaml(config: Any) -> str:
    """The config as YAML text; :func:`load_config` reads it back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
