"""Trainer settings from a config file (YAML/JSON, or a packaged recipe's name) and `--set key=value`
overrides, each value converted to its dataclass field's declared type; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError
from .loop import TrainConfig

C = TypeVar("C", bound=TrainConfig)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """A config value converted to the field's declared type (CLI overrides arrive as YAML scalars)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], name)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        items = value.split(",") if isinstance(value, str) else list(value)
        return [coerce(v.strip() if isinstance(v, str) else v, inner, name) for v in items]
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config field {name!r} expects {getattr(hint, '__name__', hint)}, got {value!r}"
        ) from None
    return value


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe(path: str | Path) -> Path:
    """A config file path, or the name of a packaged recipe (e.g. 'original-mini')."""
    p = Path(path)
    if not p.exists() and (RECIPES / f"{p.name}.yaml").is_file():
        return RECIPES / f"{p.name}.yaml"
    return p


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """A config from a YAML/JSON file (optional) with `overrides` on top; unknown keys are errors."""
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_recipe(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e}") from e
        try:
            loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(
                f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}"
            ) from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of settings, got {type(loaded).__name__}")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        head, dot, rest = key.partition(".")
        if dot:  # bart.d_model=256 sets one field of a mapping setting
            section = data.get(head)
            data[head] = {**(section if isinstance(section, dict) else {}), rest: value}
        else:
            data[key] = value
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known settings are {sorted(names)}")
    cfg = cls(**{k: coerce(v, hints[k], k) for k, v in data.items()})
    cfg.validate()
    return cfg


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """['lr=0.001', 'steps=100'] -> {'lr': 0.001, 'steps': 100} (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out
