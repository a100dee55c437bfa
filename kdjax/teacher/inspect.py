"""`kdjax inspect STORE`: what a teacher store holds, how big it is, and whether every chunk
reads back (crc32c-checked, missing chunks are errors), reported chunk by chunk."""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from kdjax.storage.arrays import describe_error
from kdjax.storage.ledger import ShardLedger
from kdjax.teacher.progress import overflow_warning
from kdjax.teacher.store import disk_bytes, open_teacher_store, signal_bytes_per_token


def _shard_stats(data: dict, manifest: dict) -> tuple[int, float, float]:
    """(loss positions, Σ distinct ids, Σ covered) of one shard's arrays, where covered is
    the teacher mass on the stored ids (topk) or the fraction of draws kept (sampled)."""
    mask = np.asarray(data["loss_mask"], bool)
    n = int(mask.sum())
    mode = manifest["mode"]
    if mode == "sampled":
        counts = np.asarray(data["counts"])[mask].astype(np.int64)
        return n, float((counts > 0).sum()), float(counts.sum() / manifest["num_samples"])
    if mode == "topk":
        lp = np.asarray(data["logprobs"], np.float64)[mask]
        return n, float(n * lp.shape[-1]), float(np.exp(lp).sum())
    return n, float(n * manifest["vocab_size"]), float(n)


def inspect_store(path: str | os.PathLike, *, check: bool = True,
                  progress: bool = True) -> dict:
    """Reads the manifest and (with `check`) every chunk of every array of a teacher store.

    Returns a report dict: manifest, complete, missing shards, rows written, size on disk,
    bytes per token (signal, and on disk over the rows written), `distinct_per_position`
    (the manifest's statistic: sampled ids drawn per position, before the U-slot cap),
    `checked`, and when checked `stored_ids_per_position` (after the cap) and the teacher
    mass covered (topk) / fraction of draws kept (sampled) measured from the stored data,
    and `problems`, one message per unreadable chunk naming the array, the chunk file and
    its rows. Shards not written yet (an incomplete store) are not read.
    """
    store = open_teacher_store(path, require_complete=False)
    m = store.manifest
    rows, length = int(m["num_rows"]), int(m["seq_len"])
    shard_rows = int(m["shard_rows"])
    num_shards = -(-rows // shard_rows)
    missing = ShardLedger(path, num_shards).missing()
    written = rows - sum(min(shard_rows, rows - s * shard_rows) for s in missing)
    size = disk_bytes(path)
    report = {"path": str(path), "manifest": m, "complete": bool(m.get("complete")),
              "missing_shards": missing, "rows_written": written, "disk_bytes": size,
              "disk_bytes_per_token": size / (written * length) if written else None,
              "signal_bytes_per_token": signal_bytes_per_token(m), "problems": [],
              "checked": check}
    stats = m.get("stats", {})
    # ids drawn per position before the U-slot cap (sampled; the manifest's statistic)
    report["distinct_per_position"] = stats.get("distinct_per_position")
    report["mass_covered"] = stats.get("mass_covered")
    if not check:
        return report
    needed = {"loss_mask", *{"sampled": ("counts",), "topk": ("logprobs",),
                             "dense": ()}[m["mode"]]}
    totals = np.zeros(3)
    skip = set(missing)  # not written yet: nothing to check (the report says they miss)
    for lo in tqdm([lo for lo in range(0, rows, shard_rows) if lo // shard_rows not in skip],
                   desc="checking chunks", unit="shard", disable=not progress):
        data, ok = {}, True
        for name, arr in store.arrays.items():
            try:
                value = arr[lo:min(lo + shard_rows, rows)].read().result()
            except ValueError as e:
                report["problems"].append(describe_error(arr, e, name=name))
                ok = False
                continue
            if name in needed:
                data[name] = value
        if ok:
            totals += _shard_stats(data, m)
    n = max(totals[0], 1.0)
    report["stored_ids_per_position"] = totals[1] / n  # after the cap, as the loss reads
    key = "sample_fraction_kept" if m["mode"] == "sampled" else "mass_covered"
    report[key] = totals[2] / n
    return report


def report_lines(r: dict) -> list[str]:
    m = r["manifest"]
    mode = m["mode"]
    params = {"topk": f"k={m.get('k')}", "dense": f"V={m['vocab_size']}",
              "sampled": f"N={m.get('num_samples')} U={m.get('num_slots')} seed={m.get('seed')}"}
    out = [f"teacher store {r['path']}",
           f"  format {m['store_format']} v{m['store_format_version']}, mode {mode} "
           f"({params[mode]}), temperature {m['temperature']}",
           f"  rows {m['num_rows']} × seq_len {m['seq_len']}, vocab {m['vocab_size']}, "
           f"shard_rows {m['shard_rows']}, chunk_rows {m['chunk_rows']}, "
           f"hidden layers {m.get('hidden_layers') or '-'}",
           f"  teacher {m['teacher_fingerprint'][:16]}  tokenizer "
           f"{str(m['tokenizer_fingerprint'])[:16]}  data {str(m['data_fingerprint'])[:16]}",
           f"  complete: {r['complete']}"
           + (f" ({len(r['missing_shards'])} shards missing)" if r["missing_shards"] else ""),
           _size_line(r)]
    if mode == "sampled" and r.get("distinct_per_position") is not None:
        out.append(f"  distinct ids drawn/position {r['distinct_per_position']:.2f} (before "
                   f"the U={m.get('num_slots')} slot cap)")
    if r.get("stored_ids_per_position") is not None:
        out.append(f"  ids stored/position {r['stored_ids_per_position']:.2f}"
                   + (" (after the slot cap)" if mode == "sampled" else ""))
    if r.get("mass_covered") is not None:
        out.append(f"  teacher mass covered {r['mass_covered']:.4f}")
    if "sample_fraction_kept" in r:
        out.append(f"  draws kept (not lost to overflow) {r['sample_fraction_kept']:.4f}")
    if (stats := m.get("stats")) and mode == "sampled":
        out.append(f"  overflow rate {stats['overflow_rate']:.4%} of positions, "
                   f"{stats.get('dropped_sample_rate', 0.0):.4%} of draws dropped")
        if warning := overflow_warning(m):
            out.append(f"  WARNING: {warning}")
    if r["problems"]:
        out.append(f"  CORRUPT: {len(r['problems'])} unreadable chunk(s):")
        out += [f"    {p}" for p in r["problems"]]
    elif not r.get("checked", True):
        out.append("  chunks NOT checked (--no-check): only the manifest was read; run "
                   "without --no-check to read every chunk and verify its crc32c")
    elif r["rows_written"]:
        out.append("  every chunk read back intact (crc32c)")
    return out


def _size_line(r: dict) -> str:
    """Size on disk and bytes per token, over the rows written so far."""
    head, signal = f"  size on disk {r['disk_bytes']:,} bytes", r["signal_bytes_per_token"]
    if not r["rows_written"]:
        return f"{head}: no shard written yet ({signal:.1f} bytes/token of teacher signal)"
    over = "" if r["complete"] else f" over the {r['rows_written']} rows written so far"
    return (f"{head}: {r['disk_bytes_per_token']:.1f} bytes/token{over} ({signal:.1f} of "
            "them teacher signal)")
