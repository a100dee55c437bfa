"""Rebuilds benchmarks/README.md from results/_summary.md and each script's results file.

    python benchmarks/collect.py

Each benchmark script writes its own `results/<area>.md` (with the command it ran); the
summary table of targets in `results/_summary.md` is kept by hand.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
AREAS = ("losses", "losses_quick", "model", "loader", "precompute", "train", "scale",
         "scan_compile")


def main() -> None:
    results = HERE / "results"
    parts = [(results / "_summary.md").read_text().rstrip() + "\n"]
    for area in AREAS:
        text = (results / f"{area}.md").read_text()
        # images sit beside the results files
        text = text.replace(f"]({area}.png)", f"](results/{area}.png)")
        parts.append(text.rstrip() + "\n")
    (HERE / "README.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'README.md'}")


if __name__ == "__main__":
    main()
