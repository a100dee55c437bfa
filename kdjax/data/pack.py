"""Packing documents into fixed-length rows.

A row of length L holds one or more segments. Each segment is a whole document or a
piece of one; segments never attend to each other (segment_ids differ; 0 = padding).
Pre-shifted targets (docs/stores.md, "Token store"): `targets[t]` is token t+1 of the
same segment, and `loss_mask[t]` is true when that next token is a training target; the
last token of a segment and padding have loss_mask False.

A document longer than the space left is split ("split" mode, no padding except at the
very end) with a one-token overlap: piece k ends with token j and piece k+1 starts with
token j, so every next-token prediction of the document is made exactly once. "pad"
mode starts a new row instead when a document that fits in a row does not fit in the
rest of the current one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MODES = ("split", "pad")


class PackPlan(NamedTuple):
    """Where each piece goes; all arrays `[pieces]` int64, sorted by (row, col)."""

    doc: np.ndarray      # source document index
    start: np.ndarray    # first token of the piece within the document
    length: np.ndarray   # tokens in the piece
    row: np.ndarray      # destination row
    col: np.ndarray      # destination column
    num_rows: int


def plan_packing(lengths: np.ndarray, seq_len: int, mode: str = "split") -> PackPlan:
    """Places documents of `lengths` ([D] int) into rows of `seq_len` tokens.

    Documents of fewer than 2 tokens are skipped (they hold no next-token target).
    Depends only on the lengths, so the row count is known before any row is written.
    """
    if mode not in MODES:
        raise ValueError(f"pack mode must be one of {MODES}, got {mode!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    out = [[] for _ in range(5)]
    row = col = 0
    for d, n in enumerate(np.asarray(lengths, np.int64).tolist()):
        if n < 2:
            continue
        s = 0
        while True:
            rem = seq_len - col
            if rem < 2 or (mode == "pad" and rem < n - s <= seq_len):
                row, col, rem = row + 1, 0, seq_len
            take = min(n - s, rem)
            for lst, v in zip(out, (d, s, take, row, col)):
                lst.append(v)
            col += take
            if s + take >= n:
                break
            s += take - 1  # one-token overlap: the piece's last token starts the next piece
    arrays = [np.asarray(lst, np.int64) for lst in out]
    num_rows = 0 if not out[0] else row + 1
    return PackPlan(*arrays, num_rows=num_rows)


def fill_rows(plan: PackPlan, lo: int, hi: int, docs: dict[int, tuple[np.ndarray, np.ndarray]],
              seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The stored arrays of rows [lo, hi).

    Args:
      plan: from `plan_packing`.
      docs: {doc index: (ids [n] int, train [n] bool)} for every document placed there.

    Returns:
      tokens [hi-lo, L] int64, segment_ids [hi-lo, L] int64 (1, 2, … per row; 0 = pad),
      loss_mask [hi-lo, L] bool (next token in the segment is a training target).
    """
    n = hi - lo
    tokens = np.full((n, seq_len), pad_id, np.int64)
    segs = np.zeros((n, seq_len), np.int64)
    mask = np.zeros((n, seq_len), bool)
    a, b = np.searchsorted(plan.row, [lo, hi])
    seg, last_row = 0, -1
    for i in range(a, b):
        r, c, k, s = plan.row[i] - lo, plan.col[i], plan.length[i], plan.start[i]
        seg = seg + 1 if r == last_row else 1
        last_row = r
        ids, train = docs[int(plan.doc[i])]
        tokens[r, c:c + k] = ids[s:s + k]
        segs[r, c:c + k] = seg
        mask[r, c:c + k - 1] = train[s + 1:s + k]
    return {"tokens": tokens, "segment_ids": segs, "loss_mask": mask}


def derive_targets_positions(tokens: np.ndarray, segment_ids: np.ndarray):
    """targets [R, L] (next token of the same segment, else 0) and positions [R, L]
    (index within the segment; 0 for padding), both int32, from stored rows."""
    tokens = tokens.astype(np.int32, copy=False)
    segment_ids = segment_ids.astype(np.int32, copy=False)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = np.where(same, tokens[:, 1:], 0)
    length = tokens.shape[1]
    idx = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    new = np.ones(tokens.shape, bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    positions = np.where(segment_ids > 0, idx - start, 0).astype(np.int32)
    return targets, positions
