"""Dict ⇄ frozen-dataclass plumbing for `kdjax.train.config`: typed building with
nearest-key suggestions, `key.sub=value` overrides, YAML and fingerprints."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, type, value or combination is wrong; the message says how to fix it."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_choice(value, choices, key: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: unknown value {value!r}{maybe}; choose one of "
                          f"{list(choices)}")


def check_layer_map(layer_map: dict, key: str) -> None:
    for s, t in layer_map.items():
        ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in (s, t))
        check(ok, key, f"entries must map a student layer index to a teacher layer index "
              f"(ints >= 0), got {s!r}: {t!r}")


def decoder_config(init: dict, key: str, **section):
    """`DecoderConfig(**init, **section)` with unknown or conflicting fields and the
    model's own validation reported against `key`."""
    from kdjax.models.config import DecoderConfig

    names = [f.name for f in dataclasses.fields(DecoderConfig)]
    for name in init:
        if name not in names:
            raise ConfigError(f"{key}: unknown DecoderConfig field {name!r}"
                              f"{_did_you_mean(str(name), names)}; valid: {names}")
        if name in section:
            raise ConfigError(f"{key}: set {name} on the model section (model.{name}), "
                              "not inside init")
    try:
        return DecoderConfig(**init, **section)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def check_kwargs(divergence: str, kwargs: dict, key: str) -> None:
    """Extra divergence arguments must be keyword arguments of the catalog function."""
    import inspect

    import kdjax.losses as losses

    fn = getattr(losses, divergence, None)
    if fn is None:
        return
    params = inspect.signature(fn).parameters
    names = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n != "temperature"]
    for name in kwargs:
        if name not in names:
            raise ConfigError(f"{key}: {divergence} takes no argument {name!r}"
                              f"{_did_you_mean(str(name), names)}; it takes {names or 'none'} "
                              "(temperature is objective.temperature)")
    missing = [n for n in names if params[n].default is params[n].empty and n not in kwargs]
    check(not missing, key, f"{divergence} needs {missing}, e.g. "
          f"objective.divergence_kwargs={{{', '.join(f'{n}: 1.0' for n in missing)}}}")


# ------------------------------------------------------------------- dataclass build


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _did_you_mean(name: str, candidates: list[str]) -> str:
    hit = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def _all_paths(cls, prefix: str = "") -> list[str]:
    paths = []
    for field in dataclasses.fields(cls):
        tp = _unwrap_optional(_hints(cls)[field.name])[0]
        path = prefix + field.name
        paths.append(path)
        if dataclasses.is_dataclass(tp):
            paths.extend(_all_paths(tp, path + "."))
    return paths


# Names users bring from other trainers, which string similarity alone would miss.
ALIASES = {"learning_rate": "lr", "batch_size": "global_batch_size", "num_steps": "steps",
           "max_steps": "steps", "train_steps": "steps", "temp": "temperature",
           "warmup": "warmup_steps", "grad_clip": "clip_norm", "max_grad_norm": "clip_norm",
           "output_dir": "run_dir", "out_dir": "run_dir", "kl": "divergence",
           "loss": "divergence", "gradient_accumulation_steps": "micro_batches"}


def _unknown_key(cls, name: str, prefix: str, root=None) -> ConfigError:
    """The error for key `name` of section `cls`, naming the nearest valid key: an alias
    (`ALIASES`, plus the root dataclass's own `ALIASES` class attribute), a similar key of
    the section, or a similar key of another section of `root` (default: the train
    `Config`)."""
    if root is None:
        from kdjax.train.config import Config as root
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = {**ALIASES, **getattr(root, "ALIASES", {})}
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


def _unwrap_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True  # kdjax configs only use `X | None`
    return tp, False


def _coerce(tp, value, key: str, root=None):
    """Checks (and mildly converts) a YAML value against a field annotation."""
    base, optional = _unwrap_optional(tp)
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
    """`cls(**data)` with unknown keys, missing required keys and types checked. `root` is
    the top-level dataclass `cls` belongs to (default: `cls` itself at prefix "", else the
    train `Config`), searched for the nearest key when one is unknown."""
    root = cls if root is None and not prefix else root
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
            kwargs[name] = _coerce(_hints(cls)[name], data[name], prefix + name, root)
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise ConfigError(f"missing required config key {prefix + name!r}")
    return cls(**kwargs)


MISSING = dataclasses.MISSING


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
        tp = _unwrap_optional(_hints(tp)[part])[0]
        if field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = MISSING
    if dataclasses.is_dataclass(default):
        default = dataclasses.asdict(default)
    return default, True


# ------------------------------------------------------------------------ overrides


def set_override(cls, data: dict[str, Any], item: str) -> None:
    """Applies one `a.b.c=value` override (value parsed as YAML) to a raw config dict,
    checking the key path against the dataclass schema `cls`."""
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
            sub = _unwrap_optional(_hints(tp)[part])[0]
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


def load(cls, path: str | os.PathLike | None, overrides=()):
    """A validated `cls` from a YAML file (optional) with `key.sub=value` overrides applied
    in order: the one loader of `kdjax train` and `kdjax precompute` settings.

    Raises:
      ConfigError: a missing or malformed file, an unknown key (naming the nearest valid
        one), a bad type or value, with the key and the value seen.
    """
    data = read_yaml(path) if path is not None else {}
    for item in overrides:
        set_override(cls, data, item)
    return build(cls, data)


def check_dir(path: str | os.PathLike | None, key: str | None, *, what: str = "directory",
              holds: str | None = None, hint: str = "") -> None:
    """Raises ConfigError (naming setting `key`, when given) unless `path` (None: not set,
    nothing to check) is an existing directory, holding the file `holds` when given."""
    if path is None:
        return
    p, name, at = os.path.expanduser(os.fspath(path)), repr(str(path)), f"{key}: " if key else ""
    if not os.path.exists(p):
        raise ConfigError(f"{at}{what} {name} does not exist{hint}")
    if not os.path.isdir(p):
        raise ConfigError(f"{at}{name} is a file, not a {what}{hint}")
    if holds and not os.path.exists(os.path.join(p, holds)):
        raise ConfigError(f"{at}{what} {name} has no {holds}{hint}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
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
