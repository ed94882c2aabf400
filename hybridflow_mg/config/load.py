"""Typed configs from YAML presets and dotted command-line overrides.

A config is a tree of keyword-only dataclasses (see `schema.py`). This module is the mechanics:

* `build(cls, mapping)` turns nested dicts into that tree, coercing scalars to the field types and
  rejecting unknown keys with the closest valid dotted key named;
* `load_config(cls, path, overrides)` reads a YAML preset (which may name a `base:` preset to start
  from), applies `a.b.c=value` overrides on top, and imports the modules of `run.imports` before
  the registry names are validated;
* `dump_config(cfg, path)` writes the resolved tree, so every run directory records exactly what ran.

Every user mistake raises `ConfigError` (a ValueError) with one line that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from hybridflow_mg.utils.files import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or override: the message names the key and the fix."""


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass tree, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = _dataclass_of(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_dotted_keys(sub, key + "."))
    return keys


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself, or X of Optional[X]); None when it is not one."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        subs = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(subs) == 1:
            return _dataclass_of(subs[0])
    return None


def _unknown_key(root: type, where: str, key: str) -> ConfigError:
    full = f"{where}{key}"
    close = difflib.get_close_matches(full, _dotted_keys(root), n=1, cutoff=0.5)
    if not close:  # a typo in the last part alone is the common case: compare just that part
        section = [k for k in _dotted_keys(root) if k.startswith(where) and "." not in k[len(where):]]
        close = difflib.get_close_matches(full, section, n=1, cutoff=0.3)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint}")


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` as type `tp` (a field's annotation), or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, root)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    sub = _dataclass_of(tp)
    if sub is not None:
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} is a section; give a mapping, not {value!r}")
        return build(sub, value, where=f"{key}.", root=root)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list; got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping; got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key, root): _coerce(v, vt, f"{key}.{k}", root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-6" as a string; float() does not mind
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string; got {value!r}")
    return value


def build(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "", root: type | None = None) -> T:
    """An instance of dataclass `cls` from a nested mapping; unknown keys are refused."""
    root = root or cls
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise _unknown_key(root, where, str(key))
    kwargs = {k: _coerce(v, hints[k], f"{where}{k}", root) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ validation: keep its message, say which section
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`actor.optim.lr=1e-6` → (["actor", "optim", "lr"], 1e-06 or "1e-6"); types are fixed later."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b=value` set; keys are checked against `cls` as they go."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls = data, cls
        for i, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                raise _unknown_key(cls, "".join(p + "." for p in path[:i]), part)
            if i == len(path) - 1:
                node[part] = value
                break
            sub = _dataclass_of(typing.get_type_hints(node_cls)[part])
            if sub is None:
                raise ConfigError(f"config key {'.'.join(path[: i + 1])!r} is not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(path[: i + 1])!r} is a section; got {node!r}")
            node_cls = sub
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else _deep_copy(v)
    return out


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset as a mapping; a top-level `base: other.yaml` (relative to the file) is merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML preset such as configs/quickstart.yaml")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {str(path)!r} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not (path.parent / base).is_file():
            raise ConfigError(f"config file {str(path)!r}: base: {base!r} is not a file (looked for "
                              f"{str(path.parent / str(base))!r}; a base is relative to the file naming it)")
        data = _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), data)
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """The resolved config: preset file (optional), then overrides, then the user modules named in
    `run.imports` (so that what they register is a valid name), then types and validation."""
    data = apply_overrides(cls, read_yaml(path) if path is not None else {}, overrides)
    run = data.get("run")
    if isinstance(run, Mapping) and run.get("imports"):
        from hybridflow_mg.utils.imports import import_user_modules

        import_user_modules(_coerce(run["imports"], list[str], "run.imports", cls))
    return build(cls, data)


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
