"""Progress bar and end-of-run summary of `kdjax precompute`."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from kdjax.teacher.store import disk_bytes, signal_bytes_per_token


class Progress:
    """tqdm over rows with tokens/s in the postfix (ETA comes from tqdm)."""

    def __init__(self, total_rows: int, seq_len: int, *, enabled: bool = True):
        self.seq_len = seq_len
        self.bar = tqdm(total=total_rows, unit="row", desc="precompute", disable=not enabled,
                        dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.rows = 0

    def update(self, rows: int) -> None:
        self.rows += rows
        rate = self.rows * self.seq_len / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(rows)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def summary_lines(summary: dict) -> list[str]:
    """A short human summary of a precompute run (what was written, where, how well)."""
    m = summary["manifest"]
    stats = m.get("stats", {})
    tokens_total = int(m["num_rows"]) * int(m["seq_len"])
    size = disk_bytes(summary["path"])
    mode = m["mode"]
    detail = {"topk": f"k={m['k']}", "dense": f"V={m['vocab_size']}",
              "sampled": f"N={m['num_samples']} U={m['num_slots']}"}[mode]
    lines = [
        f"teacher store {summary['path']}: {mode} ({detail}, T={m['temperature']}), "
        f"{m['num_rows']} rows × {m['seq_len']} = {tokens_total:,} tokens, complete",
        f"  this run: {summary['shards']} shards, {summary['rows']} rows in "
        f"{summary['seconds']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s)",
        f"  signal {signal_bytes_per_token(m):.1f} bytes/token; on disk {size:,} bytes "
        f"({size / max(tokens_total, 1):.1f} bytes/token)",
        f"  teacher mass covered {stats.get('mass_covered', float('nan')):.4f}"
        + (f", distinct ids drawn/position {stats.get('distinct_per_position', 0.0):.2f} "
           f"(before the U={m['num_slots']} slot cap)" if mode == "sampled" else ""),
    ]
    if mode == "sampled":
        lines.append(f"  overflow: {stats['overflow_rate']:.4%} of positions drew more than "
                     f"U={m['num_slots']} ids; {stats['dropped_sample_rate']:.4%} of draws "
                     "dropped")
    return lines
