"""Tiny teachers and token stores for the teacher-store tests (also used by subprocesses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SEQ_LEN = 16


def tiny_decoder(vocab_size: int = 97, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A 2-layer kdjax Decoder with random weights; the head is scaled ×40 so the softmax
    is peaked like a trained LM's (top-5 mass ≈ 0.8–1), not near uniform."""
    from flax import nnx

    from kdjax.models import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64,
                        num_layers=layers, num_heads=4, num_kv_heads=2)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    model.unembed[...] = model.unembed[...] * 40.0
    return model


def save_tiny_teacher(path, vocab_size: int = 97, seed: int = 0) -> str:
    from kdjax.models import save_pretrained

    save_pretrained(tiny_decoder(vocab_size, seed), path)
    return str(path)


def write_token_store(path, *, num_rows: int = 20, seq_len: int = SEQ_LEN,
                      vocab_size: int = 97, seed: int = 0, shard_rows: int = 8,
                      tokenizer_fingerprint: str | None = None) -> str:
    """A token store in kdjax.data's format: packed rows of 1–3 segments, some padding,
    recorded as packed with `tokenizer_fingerprint` (default: a made-up one per vocab)."""
    from kdjax.data.token_store import KIND, token_arrays
    from kdjax.storage import RowStoreWriter, fingerprint_bytes, fingerprint_json

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(num_rows, seq_len))
    seg = np.zeros((num_rows, seq_len), np.int64)
    for r in range(num_rows):
        cuts = np.sort(rng.choice(np.arange(2, seq_len - 1), size=rng.integers(0, 3),
                                  replace=False))
        end = seq_len - int(rng.integers(0, 3))  # 0–2 padding tokens at the end
        bounds = [0, *cuts[cuts < end], end]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:b] = s + 1
    tokens[seg == 0] = 0
    nxt = np.concatenate([seg[:, 1:], np.zeros((num_rows, 1), np.int64)], 1)
    loss_mask = (seg > 0) & (nxt == seg)
    arrays = token_arrays(seq_len, vocab_size)
    meta = {"kind": KIND, "seq_len": seq_len, "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint or f"tiny-tokenizer-{vocab_size}"}
    with RowStoreWriter(path, arrays=arrays, num_rows=num_rows, shard_rows=shard_rows,
                        metadata=meta) as w:
        digests = []
        for shard in range(w.num_shards):
            lo, hi = w.shard_range(shard)
            data = {"tokens": tokens[lo:hi], "segment_ids": seg[lo:hi],
                    "loss_mask": loss_mask[lo:hi]}
            digests.append(fingerprint_json({k: fingerprint_bytes(v) for k, v in data.items()}))
            w.write_shard(shard, data, {"digest": digests[-1]})
        w.finalize({"data_fingerprint": fingerprint_json({"seq_len": seq_len, "seed": seed,
                                                          "shards": digests})})
    return str(path)


def _same_json(a, b) -> bool:
    """Equal JSON values, floats to 1e-9 relative: diagnostic statistics (e.g. `mass_sum`,
    summed on the device in f32) may round differently under another device layout."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(
            a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b


def differing_files(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    """Files whose content differs: array chunks and shards byte for byte, JSON files
    (manifest, ledger) value for value with float statistics compared to 1e-6."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    bad = []
    for name, data in want.items():
        if name.endswith(".json"):
            if not _same_json(json.loads(got[name]), json.loads(data)):
                bad.append(name)
        elif got[name] != data:
            bad.append(name)
    return bad


def store_files(path) -> dict[str, bytes]:
    """{relative path: bytes} of every file of a store except writer lock files (which
    hold the writer's pid)."""
    root = Path(path)
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and not f.name.endswith(".lock")}
