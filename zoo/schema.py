"""Typed configs from plain mappings: dataclasses filled from YAML/JSON, every key and value checked.

A config section is a dataclass whose fields have defaults. A field typed :class:`BlockSpec` names a
registered block (``mixer: {type: attention, n_heads: 8}``); its ``options`` become the registered
block's own config dataclass. Every problem raises :class:`~zoo.errors.ConfigError` naming the dotted
key, the bad value and what is allowed (the closest valid key names for a typo). A dataclass may declare
``KEYS_ELSEWHERE: ClassVar[dict[str, str]]`` (key -> where it is set instead) for a better unknown-key
message. Dotted overrides (``model.n_layers=2``) apply to the raw mapping before typing, so they are
validated exactly like a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import yaml

from zoo import registry
from zoo.errors import ConfigError


@dataclass
class BlockSpec:
    """A registered block of some kind, chosen by ``type``, with its options dataclass."""

    type: str
    options: Any

    def to_dict(self) -> dict:
        return {"type": self.type, **to_plain(self.options)}


def block_field(kind: str, type_: str) -> Any:
    """A dataclass field holding a BlockSpec of ``kind`` whose default is the block ``type_``."""

    def default() -> BlockSpec:
        return BlockSpec(type_, registry.lookup(kind, type_).config())

    return field(default_factory=default, metadata={"kind": kind})


# --------------------------------------------------------------------------- overrides


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` or ``{"a.b": 1}`` as ``[("a.b", 1), ...]``; string values parse as YAML scalars."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    items = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            items.append((key.strip(), yaml.safe_load(value) if value.strip() else None))
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from err
    return items


def apply_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any] | None) -> dict:
    """Set dotted keys in a raw config mapping in place (``model.layers.0.ffn.type=mlp``)."""
    for key, value in parse_overrides(overrides):
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            part = _existing_key(node, part)
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        last = _existing_key(node, parts[-1])
        current = node.get(last)
        # A mapping merges over the block it overrides, unless it names another type (which starts
        # from that block's defaults, as per-layer overrides do).
        if (isinstance(value, Mapping) and isinstance(current, dict)
                and value.get("type", current.get("type")) == current.get("type")):
            node[last] = {**current, **value}
        else:
            node[last] = value
    return raw


def _existing_key(node: dict, part: str):
    # "layers.0" must reach the YAML int key 0.
    if part.isdigit() and int(part) in node:
        return int(part)
    return part


# --------------------------------------------------------------------------- typing


def typed(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a raw mapping, checking every key and value."""
    where = path or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    elsewhere = getattr(cls, "KEYS_ELSEWHERE", {})
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = (f"; it is set by {elsewhere[key]}." if key in elsewhere else
                    f"; did you mean {' or '.join(close)}?" if close else "")
            raise ConfigError(f"unknown key {join(path, key)!r}{hint} Valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], join(path, name), f.metadata.get("kind"))
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, kind: str | None = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, path, kind)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: {value!r} is not one of the allowed types "
                          f"({' | '.join(_type_name(a) for a in args)})")
    if tp is BlockSpec:
        return block_spec(kind, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        if not isinstance(value, typing.Hashable) or value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return typed(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        coerced = [_coerce(item, v, f"{path}[{i}]", kind) for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # JSON object keys are strings
            out[_coerce(key_type, k, f"{path} key")] = _coerce(value_type, v, join(path, k))
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: the config schema uses an unsupported type {tp!r}")


def block_spec(kind: str, value: Any, path: str) -> BlockSpec:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, Mapping) or "type" not in value:
        raise ConfigError(f"{path}: expected a mapping with a 'type' key naming a {kind} block "
                          f"({', '.join(registry.available(kind))}), got {value!r}")
    name = value["type"]
    entry = registry.lookup(kind, name) if isinstance(name, str) else None
    if entry is None:
        names = registry.available(kind)
        close = difflib.get_close_matches(name, names, n=2) if isinstance(name, str) else []
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        noun = f"{kind} block" if kind in ("mixer", "ffn", "norm") else kind
        raise ConfigError(f"{path}.type: unknown {noun} {name!r}{hint}; registered {noun}s: {', '.join(names)}")
    options = typed(entry.config, {k: v for k, v in value.items() if k != "type"}, path)
    return BlockSpec(name, options)


# --------------------------------------------------------------------------- helpers


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts, lists and scalars (what YAML and JSON write)."""
    if isinstance(obj, BlockSpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def deep_copy(obj: Any) -> Any:
    """A copy of a raw config mapping: its dicts and lists new, its scalars shared."""
    if isinstance(obj, Mapping):
        return {k: deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [deep_copy(v) for v in obj]
    return obj


def join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
