"""Loss-kernel benchmark: naive vs fused distillation, peer baselines, per-token kernels.

    python benchmarks/losses.py --quick          # ~1 min smoke run (also: kdjax bench losses)
    python benchmarks/losses.py                  # the issue's target point + N sweep
    python benchmarks/losses.py --n 2048 8192 --v 32768 131072 --h 1024 4096 --dtype bf16

Sections (each fwd+bwd: loss value and gradients of hidden and lm_head):
  grid     naive JAX (materialized f32 logits + dense forward_kl), fused_distill, and a
           torch eager baseline (logits, log_softmax + KL) at every (N, H, V, dtype);
           achieved GFLOP/s counts the 6·N·H·V matmul FLOPs, against a [N,H]@[H,V] matmul
           peak measured in the same run.
  jsd      naive JAX jsd vs fused jsd vs TRL's generalized_jsd_loss (torch port).
  head     fused TeacherHead vs an EasyDeL-style chunked_distillation_loss (remat chunks).
  kernels  the per-token dense kernels of kdjax.losses, fwd+bwd on [N, V] logits.
Times are medians of --repeats runs after a warm-up; memory is XLA's compiled temp size
(`jit(f).lower(...).compile().memory_analysis()`), never a run-time sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, ~1 minute on 2 cores")
    p.add_argument("--n", type=int, nargs="+", help="token counts N (default 2048 8192 16384)")
    p.add_argument("--h", type=int, nargs="+", help="hidden sizes H (default 1024)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes V (default 32768)")
    p.add_argument("--dtype", nargs="+", choices=["f32", "bf16"], help="input dtypes")
    p.add_argument("--compare-n", type=int, help="N for the jsd and head sections")
    p.add_argument("--kernel-n", type=int, help="tokens for the per-token kernel section")
    p.add_argument("--kernel-v", type=int, help="vocabulary for the per-token kernel section")
    p.add_argument("--sections", nargs="+", default=["grid", "jsd", "head", "kernels"],
                   choices=["grid", "jsd", "head", "kernels"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--chunk-size", type=int, help="fused chunk size (default: automatic)")
    p.add_argument("--grad-modes", nargs="+", default=["forward"],
                   choices=["forward", "recompute"], help="fused backward strategies to time")
    p.add_argument("--max-gib", type=float, default=6.0,
                   help="skip running a row whose compiled/estimated memory exceeds this "
                        "(its compiled memory is still reported)")
    p.add_argument("--run-n", type=int, nargs="+",
                   help="N values whose grid rows are timed (others: memory only); "
                        "default all")
    p.add_argument("--run-h", type=int, nargs="+", help="H values timed (default all)")
    p.add_argument("--run-v", type=int, nargs="+", help="V values timed (default all)")
    p.add_argument("--run-dtype", nargs="+", choices=["f32", "bf16"],
                   help="dtypes timed (default all)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--out", type=Path, help="markdown output (default results/losses.md, "
                   "or results/losses_quick.md with --quick); the PNG goes beside it")
    return p


def defaults(args) -> argparse.Namespace:
    q = args.quick
    args.n = args.n or ([512, 2048] if q else [2048, 8192, 16384])
    args.h = args.h or ([256] if q else [1024])
    args.v = args.v or ([16384] if q else [32768])
    args.dtype = args.dtype or ["f32"]
    args.compare_n = args.compare_n or (512 if q else 2048)
    args.kernel_n = args.kernel_n or (256 if q else 1024)
    args.kernel_v = args.kernel_v or (8192 if q else 32768)
    args.repeats = 2 if q and args.repeats == 3 else args.repeats
    args.out = args.out or RESULTS / ("losses_quick.md" if q else "losses.md")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs the benchmark for parsed `args` (`argv`: the flags, for the results header)."""
    import losses_bench_cases as cases  # heavy imports (jax, torch) only when running
    import losses_report as report

    args = defaults(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows, peaks):  # after every task, so a long run leaves partial results
        args.out.write_text(report.markdown(rows, peaks, args, argv))

    rows, peaks = cases.run_all(args, on_progress=write)
    write(rows, peaks)
    png = args.out.with_suffix(".png")
    report.plot(rows, png)
    print(report.console(rows, peaks))
    print(f"\nwrote {args.out} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
