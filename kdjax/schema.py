"""Settings of every command as frozen dataclasses: one loader, one error type, one help.

    config = load(Config, "configs/quickstart.yaml", ["optimizer.lr=1e-3", "steps=50"])
    print(settings_help(Config))        # every key, its default and its meaning

A command's settings are a (nested) frozen dataclass whose fields check themselves in
`__post_init__`. This module turns YAML files and `key.sub=value` overrides (values parsed
as YAML) into one: unknown keys are errors naming the nearest valid key (similar spelling,
the root dataclass's `ALIASES`, or the same key in another section), values are
type-checked against the annotations. It imports neither JAX nor any kdjax module and
reads no file but the YAML it is given, so parsing a command line stays cheap; the root
dataclass is always passed in, never looked up.

`kdjax train` (`kdjax.train.config.Config`) and `kdjax precompute`
(`kdjax.teacher.config.PrecomputeConfig`) read their settings through `load`; `--help`
lists them with `settings_help` (each field's meaning is the string literal under it).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import textwrap
import types
import typing
from typing import Any

import yaml

MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config key, type, value or combination is wrong; the message says how to fix it."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type."""


# ------------------------------------------------------------------------- checks


def check(ok: bool, key: str, message: str) -> None:
    """Raises `ConfigError("key: message")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_choice(value, choices, key: str) -> None:
    """Raises ConfigError naming `key`, the nearest choice and all of them unless `value`
    is one of `choices`."""
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: unknown value {value!r}{maybe}; choose one of "
                          f"{list(choices)}")


def did_you_mean(name: str, candidates) -> str:
    """` (did you mean 'x'?)` for the candidate nearest `name`, or ``."""
    hit = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def check_dir(path: str | os.PathLike | None, key: str | None, *, what: str = "directory",
              holds: str | None = None, hint: str = "") -> None:
    """Raises ConfigError (naming setting `key`, when given) unless `path` (None: not set,
    nothing to check) is an existing directory, holding the file `holds` when given. For
    commands to call before they start work; parsing never touches the disk."""
    if path is None:
        return
    p, name, at = os.path.expanduser(os.fspath(path)), repr(str(path)), f"{key}: " if key else ""
    if not os.path.exists(p):
        raise ConfigError(f"{at}{what} {name} does not exist{hint}")
    if not os.path.isdir(p):
        raise ConfigError(f"{at}{name} is a file, not a {what}{hint}")
    if holds and not os.path.exists(os.path.join(p, holds)):
        raise ConfigError(f"{at}{what} {name} has no {holds}{hint}")


# ------------------------------------------------------------------- dataclass build


@functools.cache
def hints(cls) -> dict[str, Any]:
    """The resolved field annotations of dataclass `cls`."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp) -> tuple[Any, bool]:
    """`(X, True)` for `X | None`, else `(tp, False)`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True  # kdjax configs only use `X | None`
    return tp, False


def _all_paths(cls, prefix: str = "") -> list[str]:
    paths = []
    for field in dataclasses.fields(cls):
        tp = unwrap_optional(hints(cls)[field.name])[0]
        path = prefix + field.name
        paths.append(path)
        if dataclasses.is_dataclass(tp):
            paths.extend(_all_paths(tp, path + "."))
    return paths


def _unknown_key(cls, name: str, prefix: str, root) -> ConfigError:
    """The error for key `name` of section `cls`, naming the nearest valid key: an alias
    (the root dataclass's `ALIASES` class attribute), a similar key of the section, or a
    similar key of another section of `root`."""
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = getattr(root, "ALIASES", {})
    hit = ([aliases[name]] if aliases.get(name) in names
           else difflib.get_close_matches(name, names, n=1, cutoff=0.5))
    suggestion = f" (did you mean {prefix + hit[0]!r}?)" if hit else ""
    if not hit:  # maybe it belongs to another section: match on the last path component
        paths = _all_paths(root)
        leaf = {p.rsplit(".", 1)[-1]: p for p in reversed(paths)}
        hit = difflib.get_close_matches(name, list(leaf), n=1, cutoff=0.75)
        if hit:
            suggestion = f" (did you mean {leaf[hit[0]]!r}?)"
    return ConfigError(f"unknown config key {prefix + name!r}{suggestion}; valid keys here: "
                       f"{', '.join(names)}")


def _coerce(tp, value, key: str, root):
    """Checks (and mildly converts) a YAML value against a field annotation."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigTypeError(f"{key}: a value is required, got null")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{key}: expected a mapping of {base.__name__} fields, got "
                                  f"{type(value).__name__} {value!r}")
        try:
            return build(base, value, key + ".", root=root)
        except ConfigError as e:  # sections name their own keys; nested helpers do not
            if str(e).startswith(key) or str(e).startswith(("unknown", "missing")):
                raise
            raise type(e)(f"{key}.{e}") from None
    origin = typing.get_origin(base) or base
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif origin is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    name = getattr(origin, "__name__", str(origin))
    hint = " (quote it in YAML to make it a string)" if origin is str else ""
    raise ConfigTypeError(f"{key}: expected {name}{' or null' if optional else ''}, got "
                          f"{type(value).__name__} {value!r}{hint}")


def build(cls, data: dict[str, Any], prefix: str = "", *, root=None):
    """`cls(**data)` with unknown keys, missing required keys and types checked, sections
    (nested dataclasses) built from nested mappings. `root` is the top-level dataclass
    `cls` belongs to (default: `cls`), searched for the nearest key when one is unknown."""
    root = cls if root is None else root
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                              f"{type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise _unknown_key(cls, str(name), prefix, root)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints(cls)[name], data[name], prefix + name, root)
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise ConfigError(f"missing required config key {prefix + name!r}")
    return cls(**kwargs)


def field_default(cls, dotted: str):
    """The default of a dotted config key under dataclass `cls`; `MISSING` when the key is
    not in the schema (any more) or has no default. Keys inside a free-form mapping
    (divergence_kwargs, init, layer_map) default to `MISSING` too, but count as present:
    the second value returned says whether the schema has the key."""
    tp = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return MISSING, (typing.get_origin(tp) or tp) is dict
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if part not in fields:
            return MISSING, False
        field = fields[part]
        tp = unwrap_optional(hints(tp)[part])[0]
        default = _default(field)
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return default, True


def _default(field: dataclasses.Field):
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


# ------------------------------------------------------------------------ overrides


def set_override(cls, data: dict[str, Any], item: str) -> None:
    """Applies one `a.b.c=value` override (value parsed as YAML) to a raw config dict,
    checking the key path against the dataclass schema `cls` (the root)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        form = getattr(cls, "OVERRIDE_FORM", "key.sub=value (e.g. optimizer.lr=3e-4)")
        raise ConfigError(f"override {item!r} is not of the form {form}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    parts = key.split(".")
    node, tp = data, cls  # tp: a dataclass, dict (free-form mapping) or None (a leaf)
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if dataclasses.is_dataclass(tp):
            if part not in [f.name for f in dataclasses.fields(tp)]:
                raise _unknown_key(tp, part, prefix, cls)
            name: Any = part
            sub = unwrap_optional(hints(tp)[part])[0]
            tp = sub if dataclasses.is_dataclass(sub) else (
                dict if (typing.get_origin(sub) or sub) is dict else None)
        elif tp is dict:  # free-form mapping (divergence_kwargs, init, layer_map)
            name = yaml.safe_load(part)
        else:
            raise ConfigError(f"override {item!r}: {prefix.rstrip('.')!r} is a value, not a "
                              "section")
        if i == len(parts) - 1:
            node[name] = value
        else:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]


# ----------------------------------------------------------------------------- io


def load(cls, path: str | os.PathLike | None = None, overrides=(), *, base=None):
    """A validated `cls` from a YAML file (optional; `base`, a mapping, instead) with
    `key.sub=value` overrides applied in order: the one loader of every command.

    Raises:
      ConfigError: a missing or malformed file, an unknown key (naming the nearest valid
        one), a bad type or value, with the key and the value seen.
    """
    data = read_yaml(path) if path is not None else dict(base or {})
    for item in overrides:
        set_override(cls, data, item)
    return build(cls, data)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds (ConfigError if it is missing or not one)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def fingerprint(data: dict[str, Any]) -> str:
    """sha256 hex of canonical JSON (sorted keys; int dict keys become strings)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------- help text


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: its attribute docstring, on one line} of dataclass `cls` (the string
    literal written under the field, as Sphinx reads them); missing ones are absent."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. a frozen build): no meanings
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def format_value(value) -> str:
    """A default as it would be written in YAML / on the command line."""
    if value is MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def settings(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf setting of dataclass `cls`; sections
    (nested dataclasses) are expanded in place."""
    out = []
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        tp = unwrap_optional(hints(cls)[field.name])[0]
        key = prefix + field.name
        if dataclasses.is_dataclass(tp):
            out.extend(settings(tp, key + "."))
        else:
            out.append((key, format_value(_default(field)), docs.get(field.name, "")))
    return out


def settings_help(cls, *, width: int = 92, title: str = "settings") -> str:
    """Help text listing every setting of `cls`: `key (default: X)` and its meaning."""
    lines = [f"{title} (key=value on the command line, or keys of the --config YAML file):"]
    for key, default, meaning in settings(cls):
        head = f"  {key} (default: {default})"
        text = f"{head}: {meaning}" if meaning else head
        lines.extend(textwrap.wrap(text, width, subsequent_indent="      ",
                                   break_on_hyphens=False))
    return "\n".join(lines)
