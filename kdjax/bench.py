"""`kdjax bench AREA [flags]`: the benchmark suites in the repository's benchmarks/ folder.

Each area is a script `benchmarks/<area>.py` that defines `build_parser(parser)` (adds its
flags to the given argparse parser) and `run(args, argv) -> int`, and is runnable as
`python benchmarks/<area>.py` too (see benchmarks/bench_common.py). A script is loaded
only when its area is run (`kdjax bench AREA`, `kdjax bench AREA --help`), never by any
other kdjax command; an area whose script is missing or does not follow the protocol is
an error there. Benchmarks ship with a source checkout (the editable install of the
README), not inside the wheel.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# area -> one-line help. The script is benchmarks/<area>.py.
AREAS = {
    "losses": "loss kernels: naive vs fused distillation, peer baselines, per-token kernels",
    "model": "student model forward+backward and generation, kdjax vs transformers torch",
    "layers": "layer micro-benchmarks behind the CPU forms of kdjax.models.layers",
    "loader": "token-store loader throughput vs the page-cache read ceiling",
    "precompute": "teacher-signal precompute throughput vs the bare teacher forward",
    "train": "distillation and LM training steps, kdjax vs torch (eager and chunked loss)",
    "scale": "pod configs compiled ahead of time for TPU slices; 8 fake CPU devices",
    "scan_compile": "compile time of a deep decoder, scanned layers vs a Python loop",
    "generate": "generation tokens/s (prefill, decode), kdjax vs transformers generate",
    "generate_profile": "where a generate decode step spends its time on CPU; matmul ceiling",
    "on_policy": "on-policy distillation step (rollout + teacher + update) vs TRL GKD",
    "ranking": "DPO step tokens/s, kdjax vs TRL DPOTrainer",
    "on_policy_quality": "grammar experiment: off-policy KD vs GKD, rkl_reward, MiniLLM",
    "ranking_quality": "grammar experiment: DPO and PRO on teacher-scored candidates",
}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def load(area: str):
    """The module of benchmarks/<area>.py; ValueError when it is missing or does not
    follow the protocol (no `build_parser` or `run`)."""
    path = benchmarks_dir() / f"{area}.py"
    if not path.is_file():
        raise ValueError(f"benchmark area {area!r} has no script {path}; kdjax bench runs "
                         "from a source checkout (pip install -e .)")
    if str(path.parent) not in sys.path:  # the scripts import their sibling helpers
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"kdjax_bench_{area}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("build_parser", "run") if not callable(getattr(module, name,
                                                                                None))]
    if missing:
        raise ValueError(f"{path} does not follow the kdjax bench protocol: it lacks "
                         f"{' and '.join(missing)} (see kdjax/bench.py)")
    return module


def _run(args: argparse.Namespace) -> int:
    """Loads the area's script, parses its flags (`--debug` is kdjax's, taken out) and runs
    it."""
    argv = [a for a in args.bench_argv if a != "--debug"]
    module = load(args.area)
    parser = argparse.ArgumentParser(prog=f"kdjax bench {args.area}",
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.build_parser(parser)
    return int(module.run(parser.parse_args(argv), argv) or 0)


def add_parser(subparsers) -> None:
    """Adds `bench` with one sub-subcommand per area in AREAS; no script is loaded here."""
    parser = subparsers.add_parser("bench", help="run a benchmark suite (kdjax bench losses "
                                   "--quick)", description=__doc__.splitlines()[0],
                                   epilog="Each area's flags: kdjax bench AREA --help.")
    sub = parser.add_subparsers(dest="area", metavar="AREA")
    for area, help_text in AREAS.items():
        # the area's flags are the script's: everything after AREA is handed to it as is
        # (no prefix characters here, so that --help and every flag reach the script)
        area_parser = sub.add_parser(area, help=help_text, add_help=False,
                                     prefix_chars="\0",
                                     description=f"{help_text}. Flags: kdjax bench {area} "
                                     "--help.")
        area_parser.add_argument("bench_argv", nargs="*", metavar="FLAGS",
                                 help=f"the flags of benchmarks/{area}.py")
        area_parser.set_defaults(func=_run)

    def usage(_args) -> int:
        if not (benchmarks_dir()).is_dir():
            print(f"no benchmarks/ folder next to the kdjax package ({benchmarks_dir()}); "
                  "kdjax bench runs from a source checkout (pip install -e .)")
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
