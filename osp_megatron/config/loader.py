"""Typed-dataclass configuration: YAML files plus dotted command-line overrides, strictly validated.

Unknown keys, wrong types and bad values raise ConfigError naming the dotted key and what is allowed.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from osp_megatron.config.errors import ConfigError


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    """Convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # Optional[X]: X's own message names the inner key that is wrong
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict; every key must be a field of `cls` (checked recursively)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    if hasattr(cls, "resolve_defaults"):
        data = cls.resolve_defaults(dict(data), prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    moved = getattr(cls, "MOVED_KEYS", {})
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in moved:
            raise ConfigError(f"config key '{dotted}' has moved to {moved[key]}")
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{dotted}'; allowed keys here: {allowed}")
        kwargs[key] = _convert(value, hints[key], dotted)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate(prefix=prefix) if "prefix" in validate.__code__.co_varnames else validate()
    return instance


def to_dict(instance) -> dict:
    """Plain nested dict of a config dataclass (YAML-serialisable)."""

    def _plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [_plain(v) for v in value]
        return value

    return _plain(instance)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.num_layers=4' -> (['model', 'num_layers'], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict in place (validation happens when building the dataclass)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def drop_reset_keys(cls, below: dict, layer: dict) -> dict:
    """Remove from `below` the keys that `layer`, a configuration layer over it, resets (in place).

    A section's dataclass names them with a `keys_reset_by(layer_section)` classmethod: naming model.preset
    resets the model's dimensions, so a preset given on the command line is not mixed with the file's sizes.
    Keys the layer sets itself are applied over `below` afterwards anyway.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(below, dict) or not isinstance(layer, dict):
        return below
    reset = getattr(cls, "keys_reset_by", None)
    if reset is not None:
        for key in reset(layer):
            below.pop(key, None)
    hints = typing.get_type_hints(cls)
    for key, section in layer.items():
        if key in hints and isinstance(below.get(key), dict):
            drop_reset_keys(hints[key], below[key], section)
    return below


def apply_override_layer(cls, data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to `data`, a loaded file of `cls`'s tree, as a layer over it (in place): the keys
    the layer resets go first (`drop_reset_keys`), so model.preset on the command line gives that preset's sizes."""
    overrides = list(overrides)
    drop_reset_keys(cls, data, apply_overrides({}, overrides))
    return apply_overrides(data, overrides)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` from an optional YAML file plus dotted overrides (a layer over it), validating everything."""
    data = load_yaml(path) if path is not None else {}
    apply_override_layer(cls, data, overrides or [])
    return from_dict(cls, data)
