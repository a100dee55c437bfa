"""`kdjax bench AREA [flags]`: the benchmark suites in the repository's benchmarks/ folder.

Each area is a script `benchmarks/<area>.py` that defines `build_parser(parser)` (adds its
flags to the given argparse parser) and `run(args, argv) -> int`, and is runnable as
`python benchmarks/<area>.py` too. To add an area, add it to `AREAS`; scripts that do
not exist (yet) are left out of the CLI. Benchmarks ship with a source checkout (the
editable install of the README), not inside the wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# area -> one-line help. The script is benchmarks/<area>.py.
AREAS = {
    "losses": "loss kernels: naive vs fused distillation, peer baselines, per-token kernels",
    "model": "student/teacher model forward and backward",
    "loader": "token-store loader throughput",
    "precompute": "teacher-signal precompute throughput",
    "train": "training-step throughput",
}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def _load(area: str):
    path = benchmarks_dir() / f"{area}.py"
    if not path.is_file():
        return None
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"kdjax_bench_{area}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (hasattr(module, "build_parser") and hasattr(module, "run")):
        return None  # not (yet) following the protocol above
    return module


def _run(args: argparse.Namespace) -> int:
    argv = sys.argv[sys.argv.index(args.area) + 1:] if args.area in sys.argv else []
    return int(args.bench_module.run(args, argv) or 0)


def add_parser(subparsers) -> None:
    """Adds `bench` with one sub-subcommand per available area."""
    parser = subparsers.add_parser("bench", help="run a benchmark suite (kdjax bench losses "
                                   "--quick)", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="area", metavar="AREA")
    for area, help_text in AREAS.items():
        module = _load(area)
        if module is None:
            continue
        area_parser = sub.add_parser(area, help=help_text, description=module.__doc__)
        area_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        module.build_parser(area_parser)
        area_parser.set_defaults(func=_run, bench_module=module)

    def usage(_args) -> int:
        if not (benchmarks_dir()).is_dir():
            print(f"no benchmarks/ folder next to the kdjax package ({benchmarks_dir()}); "
                  "kdjax bench runs from a source checkout (pip install -e .)")
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
