"""`kdjax inspect STORE`: what a teacher store holds, how big it is, and whether every chunk
reads back (crc32c-checked, missing chunks are errors), reported chunk by chunk."""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from kdjax.storage.arrays import describe_error
from kdjax.storage.ledger import ShardLedger
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

    Returns a report dict: manifest, complete, missing shards, size on disk, bytes per token
    (signal and on disk), distinct ids and mass covered per loss position (measured from
    the stored data when checked; else the manifest's statistics) and `problems`, one
    message per unreadable chunk naming the array, the chunk file and its rows.
    """
    store = open_teacher_store(path, require_complete=False)
    m = store.manifest
    rows, length = int(m["num_rows"]), int(m["seq_len"])
    shard_rows = int(m["shard_rows"])
    num_shards = -(-rows // shard_rows)
    size = disk_bytes(path)
    report = {"path": str(path), "manifest": m, "complete": bool(m.get("complete")),
              "missing_shards": ShardLedger(path, num_shards).missing(),
              "disk_bytes": size, "disk_bytes_per_token": size / (rows * length),
              "signal_bytes_per_token": signal_bytes_per_token(m), "problems": []}
    stats = m.get("stats", {})
    report["distinct_per_position"] = stats.get("distinct_per_position")
    report["mass_covered"] = stats.get("mass_covered")
    if not check:
        return report
    needed = {"loss_mask", *{"sampled": ("counts",), "topk": ("logprobs",),
                             "dense": ()}[m["mode"]]}
    totals = np.zeros(3)
    for lo in tqdm(range(0, rows, shard_rows), desc="checking chunks", unit="shard",
                   disable=not progress):
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
    report["distinct_per_position"] = totals[1] / n
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
           f"  size on disk {r['disk_bytes']:,} bytes: {r['disk_bytes_per_token']:.1f} "
           f"bytes/token ({r['signal_bytes_per_token']:.1f} of them teacher signal)"]
    if r.get("distinct_per_position") is not None:
        out.append(f"  distinct ids/position {r['distinct_per_position']:.2f}")
    if r.get("mass_covered") is not None:
        out.append(f"  teacher mass covered {r['mass_covered']:.4f}")
    if "sample_fraction_kept" in r:
        out.append(f"  draws kept (not lost to overflow) {r['sample_fraction_kept']:.4f}")
    if (stats := m.get("stats")) and mode == "sampled":
        out.append(f"  overflow rate {stats['overflow_rate']:.4%} of positions")
    if r["problems"]:
        out.append(f"  CORRUPT: {len(r['problems'])} unreadable chunk(s):")
        out += [f"    {p}" for p in r["problems"]]
    elif "sample_fraction_kept" in r or "mass_covered" in r:
        out.append("  every chunk read back intact (crc32c)")
    return out
