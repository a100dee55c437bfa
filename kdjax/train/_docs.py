"""Settings help from the config dataclasses themselves: every key, its default and its
meaning (the attribute docstring under each field), for `--help` and the README.

    print(settings_help(PrecomputeConfig))     # `kdjax precompute --help`
    print(settings_help(Config))               # `kdjax train --help` (dotted keys)
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap

from kdjax.train._schema import _hints, _unwrap_optional


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
    if value is dataclasses.MISSING:
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


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def settings(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf setting of dataclass `cls`; sections
    (nested dataclasses) are expanded in place."""
    out = []
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        tp = _unwrap_optional(_hints(cls)[field.name])[0]
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
