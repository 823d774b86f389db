"""TOML tables -> dataclasses: the one strict loader behind factory jobs and trainer configs.

A config is a dataclass whose fields are values or nested section dataclasses. `build` checks
every key against the fields (an unknown key is an error naming it and the keys its section
knows) and every value against the field's type (an int where a number is expected is
widened to float, a list becomes a tuple, a string a Path), naming the dotted key in errors.
Each caller passes its own error class (factory `JobConfigError`, trainer `ConfigError`), so
its errors stay its own; the dataclasses' `__post_init__` checks ranges and choices.

A required field the table leaves out is passed as None (a section: built from an empty
table), so that the dataclass's own check can say which setting or flag supplies it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING


def read_table(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The TOML file at `path`, or `error` saying it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from None


def resolve_paths(table: dict[str, Any], keys: tuple[str, ...], base: Path) -> None:
    """Make the relative paths at the dotted `keys` (strings, or lists of them) relative to
    `base`, in place. URIs (`s3://...`) are left as written: Path() would fold their `//`."""
    def rel(p: Any) -> Any:
        if not isinstance(p, str) or "://" in p:
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    for dotted in keys:
        *sections, leaf = dotted.split(".")
        node: Any = table
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node[leaf]
            node[leaf] = [rel(p) for p in value] if isinstance(value, list) else rel(value)


def apply_overrides(table: dict[str, Any], overrides: Mapping[str, Any] | None, error: type[Exception]) -> None:
    """Set `{"section.key": value}` in `table`, in place, over what the file gave; None
    values are skipped (a flag not given)."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, leaf = dotted.split(".")
        node = table
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise error(f"override {dotted}: {s} is not a section")
        node[leaf] = value


def build(cls: type, table: Any, *, error: type[Exception], source: str, term: str = "key",
          prefix: str = "") -> Any:
    """A `cls` from a TOML table, checking keys and value types; errors are `error`s that name
    `source` (the file, or the flags) and the dotted key. `term` is what the caller's docs
    call a key ("key", "field")."""
    name = prefix.rstrip(".") or "the top level"
    if not isinstance(table, dict):
        raise error(f"{source}: {name} must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise error(f"{source}: unknown {term}(s) {', '.join(prefix + k for k in unknown)}; {name} takes "
                    f"{', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        hint = hints[key]
        if key in table:
            kwargs[key] = _convert(hint, table[key], prefix + key, error, source, term)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            # The dataclass says which setting or flag supplies it.
            kwargs[key] = build(hint, {}, error=error, source=source, term=term, prefix=f"{prefix}{key}.") \
                if dataclasses.is_dataclass(hint) else None
    try:
        return cls(**kwargs)
    except error:
        raise
    except (TypeError, ValueError) as e:  # a dataclass check that raised its own kind
        raise error(f"{source}: {name}: {e}") from None


def _convert(hint: Any, value: Any, key: str, error: type[Exception], source: str, term: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, error=error, source=source, term=term, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # A value already of one of the types stays as it is (a str in `Path | str` is kept).
        for option in options:
            if isinstance(option, type) and _is_instance(value, option):
                return value
        for option in options[:-1]:
            try:
                return _convert(option, value, key, error, source, term)
            except error:
                continue
        return _convert(options[-1], value, key, error, source, term)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            inner = (args[0],) * len(value)
        elif len(value) != len(args):
            raise error(f"{source}: {key} must be a list of {len(args)}, got {value!r}")
        else:
            inner = args
        return tuple(_convert(t, v, f"{key}[{i}]", error, source, term) for i, (t, v) in enumerate(zip(inner, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{source}: {key} must be a table, got {value!r}")
        return dict(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise error(f"{source}: {key} must be a path string, got {value!r}")
        # A URI or "" is passed on as written (Path() would fold the "//", or make "" "."): the
        # dataclass decides what it takes.
        return value if isinstance(value, str) and ("://" in value or not value) else Path(value)
    if hint is float:
        if not _is_instance(value, float):
            raise error(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint in (int, bool, str):
        if not _is_instance(value, hint):
            raise error(f"{source}: {key} must be {'an' if hint is int else 'a'} {hint.__name__}, got {value!r}")
        return value
    return value


def _is_instance(value: Any, kind: type) -> bool:
    """isinstance as TOML means it: a bool is no number, an int is a float."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
