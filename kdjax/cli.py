"""`kdjax …` command-line entry points.

Each subcommand lives in the module that owns the work; this file only wires them up.
A module registers itself by exposing `add_parser(subparsers)` which sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that provides add_parser)
_COMMANDS = (
    ("quickstart", "kdjax.quickstart"),
    ("precompute", "kdjax.teacher.cli"),
    ("inspect", "kdjax.teacher.cli"),
    ("train", "kdjax.train.cli"),
    ("eval", "kdjax.train.cli"),
    ("export", "kdjax.train.cli"),
    ("pack", "kdjax.data.cli"),
    ("bench", "kdjax.bench"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name, module in _COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet
        if module in seen:
            continue
        seen.add(module)
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
