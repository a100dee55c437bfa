"""Rebuilds benchmarks/README.md from results/_summary.md and each script's results file.

    python benchmarks/collect.py

Each benchmark script writes its own `results/<area>.md` (with the command it ran); the
summary table of targets in `results/_summary.md` is kept by hand, and the per-grid-point
memory targets below it are computed here from the grid of `results/losses.md`. Notes
and measurements of past sessions that no command here reproduces live in `notes/`, not
in the README.
"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
AREAS = ("losses", "losses_quick", "model", "model_2cores", "layers", "loader", "precompute",
         "train", "train_2cores", "scale", "scan_compile", "generate", "generate_profile",
         "on_policy", "on_policy_quality", "ranking", "ranking_quality")
GRID_ROW = re.compile(r"^\| (naive JAX|fused) \| (\d+) \| (\d+) \| (\d+) \| (f32|bf16) \| "
                      r"[^|]* \| ([\d,]+) \|")
TARGET_RATIO = 0.10  # issue 3: fused temp memory ≤ 10% of naive


def memory_targets(losses_md: str) -> str:
    """The issue-3 memory targets at every grid point of results/losses.md."""
    mem = {}  # (N, H, V, dtype) -> {"naive": MiB, "fused": MiB}
    for line in losses_md.splitlines():
        m = GRID_ROW.match(line)
        if m:
            kind, n, h, v, dtype, mib = m.groups()
            mem.setdefault((int(n), int(h), int(v), dtype), {})[kind.split()[0]] = float(
                mib.replace(",", ""))
    points = sorted((k for k, x in mem.items() if len(x) == 2),
                    key=lambda k: (k[3] != "f32", k[1], k[2], k[0]))
    lines = [
        "### Memory targets per grid point (issue 3)", "",
        "Computed by `python benchmarks/collect.py` from the grid of `results/losses.md` "
        "(compiled temp memory of the fused and naive fwd+bwd; the command is in that "
        "section). Targets: fused ≤ 10% of naive; fused memory without an N·V term, i.e. "
        "no growth with N at fixed H, V (growth is given in bytes per added N·V element "
        "against the smallest N of the same H, V, dtype: 2 is one 16-bit `[N, V]` array).",
        "",
        "| N | H | V | dtype | naive MiB | fused MiB | fused ÷ naive | ≤ 10%? | growth, bytes "
        "per N·V | no N·V term? |", "|---:|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for n, h, v, dtype in points:
        naive, fused = mem[n, h, v, dtype]["naive"], mem[n, h, v, dtype]["fused"]
        n0 = min(k[0] for k in points if k[1:] == (h, v, dtype))
        if n == n0:
            growth, term = "—", "—"
        else:
            per = (fused - mem[n0, h, v, dtype]["fused"]) * 2**20 / ((n - n0) * v)
            growth = f"{per:.2f}"
            term = ("yes" if abs(per) < 0.01 else
                    "**no: open** (CPU bf16 dense-teacher copy)" if dtype == "bf16" else "**no**")
        ratio = fused / naive
        lines.append(f"| {n} | {h} | {v} | {dtype} | {naive:,.0f} | {fused:,.0f} | "
                     f"{ratio:.1%} | {'yes' if ratio <= TARGET_RATIO else '**no**'} | "
                     f"{growth} | {term} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    results = HERE / "results"
    losses = (results / "losses.md").read_text()
    parts = [(results / "_summary.md").read_text().rstrip() + "\n", memory_targets(losses)]
    for area in AREAS:
        text = (results / f"{area}.md").read_text()
        # images sit beside the results files
        text = text.replace(f"]({area}.png)", f"](results/{area}.png)")
        parts.append(text.rstrip() + "\n")
    (HERE / "README.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
