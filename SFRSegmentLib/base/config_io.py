"""Typed configuration ↔ plain JSON: dataclasses filled from dicts with errors that name the bad field.

Every stage's options are a dataclass; the run configuration nests them. This module turns such a dataclass into
a JSON-ready dict and back, applying partial overrides (``{"finetune": {"iterations": 50}}``), and rejects unknown
fields and wrongly typed values with the dotted path of the field (``finetune.iterations``) and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, TypeVar, Union

from .errors import InputError, PathLike

T = TypeVar("T")


def to_dict(config: Any) -> Dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass: tuples become lists, paths strings."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def with_overrides(config: T, overrides: Mapping[str, Any], source: Optional[PathLike] = None,
                   prefix: str = "") -> T:
    """A copy of ``config`` with the values in ``overrides`` (a nested dict, possibly partial) applied and checked."""
    if not isinstance(overrides, Mapping):
        raise InputError(f"{prefix or 'configuration'} must be a JSON object, got {_kind(overrides)}", source,
                         prefix or None)
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config) if f.init}
    overrides = _without_aliases(overrides, getattr(config, "ALIASES", {}), source, prefix)
    changes = {}
    for name, value in overrides.items():
        path = f"{prefix}{name}"
        if name not in known:
            raise InputError(f"unknown option {path!r}; known options here: {', '.join(sorted(known))}",
                             source, path)
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[name] = with_overrides(current, value, source, f"{path}.")
        else:
            changes[name] = _coerce(value, hints[name], path, source)
    try:
        return dataclasses.replace(config, **changes)
    except InputError as exc:
        raise InputError(str(exc), source, exc.field and f"{prefix}{exc.field}") from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid value in {prefix.rstrip('.') or 'configuration'}: {exc}", source,
                         prefix.rstrip(".") or None) from exc


def _without_aliases(overrides: Mapping[str, Any], aliases: Mapping[str, Callable[[Any], Dict[str, Any]]],
                     source: Optional[PathLike], prefix: str) -> Mapping[str, Any]:
    """``overrides`` with each alias (an option name the class still reads, see ``ALIASES`` in
    :mod:`SFRSegmentLib.base.config`) replaced by the fields it stands for; InputError when a field is also given
    with another value."""
    if not any(name in aliases for name in overrides):
        return overrides
    fields = {name: value for name, value in overrides.items() if name not in aliases}
    for alias in (name for name in overrides if name in aliases):
        try:
            implied = aliases[alias](overrides[alias])
        except InputError as exc:
            raise InputError(str(exc), source, f"{prefix}{alias}") from exc
        for name, value in implied.items():
            if name in fields and fields[name] != value:
                raise InputError(f"{prefix}{alias} {overrides[alias]!r} means {prefix}{name} {value!r}, but "
                                 f"{prefix}{name} is {fields[name]!r}: give one of the two", source,
                                 f"{prefix}{alias}")
            fields[name] = value
    return fields


def set_option(overrides: Dict[str, Any], path: str, value: Any) -> None:
    """Set the option at the dotted ``path`` in the nested overrides ``overrides`` (``retrain.lr`` →
    ``{"retrain": {"lr": value}}``), creating its sections."""
    *sections, name = path.split(".")
    for section in sections:
        overrides = overrides.setdefault(section, {})
    overrides[name] = value


def merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``top``'s values over it, nested objects merged key by key."""
    result = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def given_paths(overrides: Mapping[str, Any], prefix: str = "") -> FrozenSet[str]:
    """The dotted paths of the options that ``overrides`` sets (a section's object counts for each of its keys)."""
    paths = set()
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            paths |= given_paths(value, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return frozenset(paths)


def load_overrides(path: PathLike) -> Dict[str, Any]:
    """Read a JSON configuration file (a nested object of overrides)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError("configuration file not found", path) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}", path) from exc
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object, got {_kind(data)}", path)
    return data


def _coerce(value: Any, hint: Any, path: str, source: Optional[PathLike]) -> Any:
    """Check ``value`` against the annotation ``hint``; convert lists to tuples and strings to paths."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path, source)
            except InputError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{path} must be one of {list(args)}, got {value!r}", source, path)
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{path} must be a list, got {_kind(value)}", source, path)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise InputError(f"{path} must have {len(args)} values, got {len(value)}", source, path)
            item_hints = args
        else:
            item_hints = (args[0] if args else Any,) * len(value)
        items = [_coerce(v, h, f"{path}[{i}]", source) for i, (v, h) in enumerate(zip(value, item_hints))]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise InputError(f"{path} must be a JSON object, got {_kind(value)}", source, path)
        return with_overrides(hint(), value, source, f"{path}.")
    if hint is Any:
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise InputError(f"{path} must be a path (string), got {_kind(value)}", source, path)
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path} must be a number, got {_kind(value)}", source, path)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{path} must be a whole number, got {_kind(value)}", source, path)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{path} must be true or false, got {_kind(value)}", source, path)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{path} must be a string, got {_kind(value)}", source, path)
        return value
    return value


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__
