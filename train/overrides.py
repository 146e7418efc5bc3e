"""``--config FILE --set key=value`` for any typed dataclass config: one resolver for every command.

Training, evaluation and studies take the same dialect: a YAML file (sections or dotted keys) and then
``--set`` overrides, applied in that order onto the dataclass defaults, which are the only defaults. A key
is a dotted path (``optim.lr``), a section name meaning its ``name`` field (``backbone=resnet18`` sets
``backbone.name``), or a field name that exactly one section has (``queue_size``). A short name that
several sections share is refused with the full keys to choose from: ``momentum`` could be the
optimiser's or MoCo's, and guessing silently would train another model than the user asked for. An
unknown key is refused with the closest valid keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "add_set_argument",
    "apply_overrides",
    "config_keys",
    "parse_assignment",
    "read_yaml_overrides",
    "resolve_key",
]


def parse_assignment(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, value): the argparse type of ``--set``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def add_set_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """The repeatable ``--set KEY=VALUE`` option every command shares; values land in ``overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        type=parse_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help,
    )


def config_keys(obj: Any, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Dotted path -> (owning dataclass, field name) for every scalar field of ``obj``."""
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(config_keys(value, path + "."))
        else:
            out[path] = (obj, f.name)
    return out


def _closest(key: str, keys: Iterable[str]) -> list[str]:
    """Valid keys nearest to a misspelt one: whole dotted paths first, then by their last part."""
    keys = sorted(keys)
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    by_name = {k.rsplit(".", 1)[-1]: k for k in keys}
    near += [by_name[n] for n in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_name, n=3, cutoff=0.6)]
    return list(dict.fromkeys(near))[:3]


def resolve_key(obj: Any, key: str, skip_sections: Iterable[str] = ()) -> tuple[Any, str, str]:
    """(owner, field name, dotted path) that ``key`` names in ``obj``.

    Args:
        obj: the root dataclass.
        key: dotted path, section name (for its ``name`` field) or a field name unique among sections.
        skip_sections: top-level sections a short name never means (e.g. the sections of methods that
            are not running), so ``hidden`` is MoCo's in a MoCo run; a dotted path still reaches them.

    Raises:
        ValueError: unknown key (with the closest valid keys) or a short name several sections share
            (with every full key it could mean).
    """
    keys = config_keys(obj)
    if key in keys:
        return (*keys[key], key)
    if dataclasses.is_dataclass(getattr(obj, key, None)) and f"{key}.name" in keys:
        return (*keys[f"{key}.name"], f"{key}.name")
    skipped = tuple(f"{s}." for s in skip_sections)
    matches = [p for p in keys if p.rsplit(".", 1)[-1] == key and not p.startswith(skipped)]
    if len(matches) == 1:
        return (*keys[matches[0]], matches[0])
    if matches:
        raise ValueError(
            f"config key {key!r} is ambiguous: it could be {' or '.join(matches)}; use the full key"
        )
    near = _closest(key, keys)
    hint = f"; did you mean {' or '.join(near)}?" if near else f"; valid keys: {', '.join(sorted(keys))}"
    raise ValueError(f"unknown config key {key!r}{hint}")


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _scalar(kind: Any, value: Any) -> Any:
    """One value as ``kind`` (bool, int, float, str); other kinds are left as given."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _TRUE + _FALSE:
            raise ValueError(value)
        return str(value).lower() in _TRUE
    if kind is float and isinstance(value, bool):
        raise ValueError(value)
    if kind in (int, float):
        return kind(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads ``budget: 1024`` as a number
    return value


def _coerce(owner: Any, name: str, value: Any, key: str) -> Any:
    """``value`` (a string from the command line, or a YAML value) as the field's declared type.

    Tuples take ``a,b``, ``[a, b]`` (JSON) or a YAML list, and every element gets the declared element
    type (``tuple[int, ...]``: ``--set seeds=0,1`` is ``(0, 1)``).
    """
    hint = typing.get_type_hints(type(owner))[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if (typing.get_origin(hint) in (typing.Union, types.UnionType) and args) else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    given = value
    try:
        if typing.get_origin(base) is tuple:
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else value.split(",")
            element = (typing.get_args(base) or (Any,))[0]
            return tuple(_scalar(element, v.strip() if isinstance(v, str) else v) for v in value)
        return _scalar(base, value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ValueError(
            f"config key {key}: cannot read {given!r} as {getattr(base, '__name__', base)}"
        ) from None


def apply_overrides(obj: Any, overrides: Mapping[str, Any], skip_sections: Iterable[str] = ()) -> Any:
    """Set fields of ``obj`` from keys (see :func:`resolve_key`) to values; strings are parsed.

    Each changed section is validated again (its ``__post_init__``), so a bad value is refused with its key.
    """
    skip_sections = tuple(skip_sections)
    for key, value in overrides.items():
        owner, name, path = resolve_key(obj, key, skip_sections)
        setattr(owner, name, _coerce(owner, name, value, path))
        if hasattr(owner, "__post_init__"):
            owner.__post_init__()
    return obj


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_yaml_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML config file (nested sections or dotted keys) as flat ``key -> value`` overrides."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: a config file must be a mapping of keys to values")
    return _flatten(tree)
