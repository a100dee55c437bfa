"""`kdjax …` command-line entry points.

Each subcommand lives in the module that owns the work; this file only wires them up.
A module registers itself by exposing `add_parser(subparsers)` which sets `func`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that provide add_parser, in the order `kdjax --help` lists their commands:
# quickstart; pack; precompute, inspect; generate, filter; score; train, eval, export; convert;
# compile; bench
_MODULES = (
    "kdjax.quickstart",
    "kdjax.data.cli",
    "kdjax.teacher.cli",
    "kdjax.generate.cli",
    "kdjax.score.cli",
    "kdjax.train.cli",
    "kdjax.models.convert_cli",
    "kdjax.compile.cli",
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


# exit statuses of every command: 0 done; 2 a user error (a bad setting, a missing path, a
# store that belongs to another run), one line on stderr; 3 data damage (a store file that
# fails its checks: rebuild it, or re-run its writer); 130 interrupted
EXIT_USAGE, EXIT_DATA_DAMAGE, EXIT_INTERRUPTED = 2, 3, 130
DEBUG_HELP = ("Errors print one line (exit status 2, or 3 for a damaged store); add --debug "
              "(anywhere) or set KDJAX_DEBUG=1 for the full traceback")


def _exit_status(error: BaseException) -> int | None:
    """The exit status of an error users cause (None: a bug, let the traceback show)."""
    from kdjax.storage.errors import StoreCorruptError, StoreError

    if isinstance(error, StoreCorruptError):
        return EXIT_DATA_DAMAGE
    user = (StoreError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, FileExistsError)
    return EXIT_USAGE if isinstance(error, user) else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("KDJAX_DEBUG", "") not in ("", "0")
    parser = build_parser()
    parser.epilog = f"{parser.epilog} {DEBUG_HELP}."
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--debug"]  # accepted after any command
    if isinstance(getattr(args, "overrides", None), list):  # key=value after a --flag too
        args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return run_command(args, debug=debug)


def run_command(args: argparse.Namespace, *, debug: bool = False) -> int:
    """Runs a parsed command (`args.func(args)`): a user error becomes one line on stderr
    (what was wrong, the value seen, what to do) and its exit status, unless `debug`."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"kdjax {getattr(args, 'command', '')}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        status = _exit_status(e)
        if debug or status is None:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"kdjax {getattr(args, 'command', '')}: {message} (--debug for the traceback)",
              file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
