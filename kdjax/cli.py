"""`kdjax …` command-line entry points.

Each subcommand lives in the module that owns the work; this file only wires them up.
A module registers itself by exposing `add_parser(subparsers)` which sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that provide add_parser, in the order `kdjax --help` lists their commands:
# quickstart; pack; precompute, inspect; train, eval, export; bench
_MODULES = (
    "kdjax.quickstart",
    "kdjax.data.cli",
    "kdjax.teacher.cli",
    "kdjax.train.cli",
    "kdjax.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdjax",
        description="Knowledge distillation for large language models in JAX.",
        epilog="Start with `kdjax quickstart`; every command takes --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _MODULES:
        importlib.import_module(module).add_parser(sub)
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
