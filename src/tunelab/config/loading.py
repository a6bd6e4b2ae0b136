"""YAML configs with dotted key=value overrides, validated by pydantic, with errors people can act on:
the file, the dotted field path, what is wrong, and for an unknown key the nearest valid one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, found {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-5' -> (['train', 'lr'], 3e-05); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.lr=3e-5)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each dotted override set (intermediate mappings created as needed)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


def _valid_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names at a dotted location of a schema (for suggestions)."""
    current: Any = model
    for part in path:
        if isinstance(part, int) and isinstance(current, type) and issubclass(current, BaseModel):
            continue  # an item of a list of sections: _model_type found the item's section already
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _model_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_type(annotation: Any) -> Any:
    """The BaseModel inside an annotation like `LoraConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = [f"{source}: invalid config:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _valid_keys(schema, loc[:-1]), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"  {dotted}: unknown key{hint}")
        else:
            lines.append(f"  {dotted}: {item['msg']}")
    return "\n".join(lines)


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, schema, source)) from None


def load_config(schema: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML file (or start empty when path is None), apply overrides, and validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(schema, data, str(path) if path is not None else "config")


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
