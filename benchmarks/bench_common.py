"""What the benchmark scripts share: timing, the machine line of a results file, the
decoder-shape flags, writing a results file, and the `kdjax bench` protocol's `main`.

Every area script `benchmarks/<area>.py` defines `build_parser(parser=None)` (adds its
flags to `parser`, or to a new parser, and returns it) and `run(args, argv) -> int`
(`argv`: the flags as given, for the results file's "Command:" line); `main(argv)` of
this module ties them together for `python benchmarks/<area>.py`. Heavy imports that a
`--help` does not need happen inside `run`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(build_parser: Callable, run: Callable, argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/<area>.py [flags]`: parse `argv` (default sys.argv[1:]), run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return int(run(build_parser().parse_args(argv), argv) or 0)


def new_parser(doc: str | None, parser: argparse.ArgumentParser | None = None
               ) -> argparse.ArgumentParser:
    """`parser` (from `kdjax bench AREA`), or a new one described by the script's docstring."""
    if parser is not None:
        return parser
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_shape_flags(p: argparse.ArgumentParser, *, layers: int, hidden: int, vocab: int,
                    batch: int, seq: int, repeats: int) -> None:
    """The decoder-shape and repeat flags of the model benchmarks, plus `--out`."""
    p.add_argument("--layers", type=int, default=layers, help="decoder layers")
    p.add_argument("--hidden", type=int, default=hidden, help="hidden size")
    p.add_argument("--vocab", type=int, default=vocab, help="vocabulary size")
    p.add_argument("--batch", type=int, default=batch, help="rows per step")
    p.add_argument("--seq", type=int, default=seq, help="tokens per row")
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats (median)")
    p.add_argument("--out", default=None, help="write the markdown section here")


def command(script: str, argv: Sequence[str]) -> str:
    """The shell command that reran this benchmark, for the results file."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def threads() -> int:
    """Cores this process may run on: what XLA:CPU sizes its thread pools from, and what
    the torch rows are given with `torch.set_num_threads`."""
    return len(os.sched_getaffinity(0))


def machine(*, torch_version: bool = False) -> str:
    """CPU, cores, load average, library versions: the setup sentence of a results file."""
    import jax

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(load average {load} over 1/5/15 min when written), jax {jax.__version__}")
    if torch_version:
        import torch

        text += f", torch {torch.__version__}"
    return text


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` after `warmup` calls (fn must block until done)."""
    return timed_interleaved([fn], repeats, warmup)[0]


def timed_interleaved(fns: Sequence[Callable[[], object]], repeats: int,
                      warmup: int = 1) -> list[float]:
    """Median seconds of each fn after `warmup` calls of each, alternating the calls so
    that changes in load on a shared machine hit every contestant alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def write(text: str, out: str | Path | None) -> None:
    """Prints the markdown section and writes it to `out` (when given)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {out}")


def single_thread() -> None:
    """One core and one XLA thread, set before JAX starts its CPU backend (`--single-thread`
    of the model benchmarks). XLA's CPU runtime also splits loop/YNN fusions over its own
    thread pool (sized from the visible cores), which the Eigen flag does not control;
    pinning the process to one core is what makes "one thread each" true for both XLA and
    torch."""
    if backend_started():
        raise ValueError("--single-thread must be set before JAX starts its backend")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false")


def backend_started() -> bool:
    """Whether JAX has created its backends (after which XLA flags no longer apply)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
