"""Progress bar, end-of-run summary and overflow warning of `kdjax precompute`."""

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


def _percent(x: float) -> str:
    """2 decimals, or 2 significant digits below 0.01% (a small rate is not shown as 0)."""
    return f"{x:.2%}" if x >= 1e-4 else f"{x * 100:.2g}%"


def overflow_warning(manifest: dict) -> str | None:
    """Why a sampled store's signal is biased, or None when it is not (every draw kept).

    A position that drew more than U distinct ids keeps the U largest counts and drops
    the other draws, so t̂ = counts/N is no longer an unbiased estimate of the teacher:
    it is short on the rare ids, which pulls the student towards the head (see
    `kdjax.teacher.signal`). The text names the fraction of draws dropped, N, U and the
    fix; `kdjax precompute` prints it at the end of every run whose store has dropped
    draws, with or without the progress output, and `kdjax inspect` repeats it.
    """
    stats = manifest.get("stats") or {}
    if manifest.get("mode") != "sampled" or not stats.get("dropped_samples"):
        return None
    n, u = manifest["num_samples"], manifest["num_slots"]
    return (f"{_percent(stats['dropped_sample_rate'])} of the sampled draws were dropped "
            f"({stats['dropped_samples']:,} draws; {_percent(stats['overflow_rate'])} of "
            f"positions drew more than U={u} distinct ids of their N={n} draws and kept only "
            f"the U largest counts), so the sampled teacher counts/N is biased towards the "
            f"head of the teacher's distribution, not an unbiased estimate of it. To keep "
            f"every draw, set num_slots=null (U = N, the default) or num_slots={n} and rerun "
            "`kdjax precompute` with --overwrite.")
