"""The token store: packed rows of a tokenized dataset, as a kdjax.storage row store.

Stored arrays (each `[rows, L]`): `tokens` (smallest unsigned id dtype), `segment_ids`
(smallest unsigned dtype holding L; 0 = padding) and `loss_mask` (bool), kept in the
row store's "record" layout (one chunk per row) by `build_token_store`; stores in the
"arrays" layout read the same. `targets` and `positions` are derived on read
(`targets_positions`, equal to `pack.derive_targets_positions`), so they cost no disk
bytes. The manifest records seq_len, vocab_size, the tokenizer fingerprint, the packing
settings and a data fingerprint (a sha256 over the rows' contents, independent of the
shard layout: two stores with the same fingerprint hold the same rows).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from kdjax.storage import (
    RowStore,
    StoreIncompleteError,
    StoreMismatchError,
    fingerprint_json,
    id_dtype,
    smallest_uint,
)

KIND = "kdjax.token_store"
KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def token_arrays(seq_len: int, vocab_size: int) -> dict[str, tuple[tuple[int], np.dtype]]:
    """{name: (row shape, dtype)} of a token store, as RowStoreWriter takes it."""
    return {"tokens": ((seq_len,), id_dtype(vocab_size)),
            "segment_ids": ((seq_len,), smallest_uint(seq_len)),
            "loss_mask": ((seq_len,), np.dtype(bool))}


def rows_digest(data: dict[str, np.ndarray], first_row: int) -> int:
    """Σ over rows i of sha256(i, row i of every array) mod 2^256, for rows
    [first_row, first_row + n) of `data` (stored dtypes). Sums of disjoint row ranges add
    up, so the store's data fingerprint does not depend on how rows are sharded."""
    names = sorted(data)
    total = 0
    for r in range(len(data[names[0]])):
        h = hashlib.sha256(str(first_row + r).encode())
        for k in names:
            h.update(np.ascontiguousarray(data[k][r]).tobytes())
        total += int.from_bytes(h.digest(), "big")
    return total % (1 << 256)


def data_fingerprint(*, seq_len: int, vocab_size: int, num_rows: int, digest: int) -> str:
    """The data fingerprint recorded in the manifest (see `rows_digest`)."""
    return fingerprint_json({"seq_len": seq_len, "vocab_size": vocab_size,
                             "num_rows": num_rows, "rows_digest": f"{digest:064x}"})


def targets_positions(tokens: np.ndarray, segment_ids: np.ndarray):
    """What `pack.derive_targets_positions` computes (targets [R, L]: next token of the
    same segment, else 0; positions [R, L]: index within the segment, 0 for padding; both
    int32), faster for the loader's hot path: positions from the flat segment starts
    with `np.repeat` instead of a `maximum.accumulate` scan."""
    rows, length = tokens.shape
    targets = np.zeros((rows, length), np.int32)
    if tokens.size == 0:
        return targets, targets.copy()
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    same &= segment_ids[:, :-1] > 0
    np.multiply(tokens[:, 1:], same, out=targets[:, :-1], casting="unsafe")
    new = np.empty((rows, length), bool)  # a segment (or row) starts here
    new[:, 0] = True
    np.not_equal(segment_ids[:, 1:], segment_ids[:, :-1], out=new[:, 1:])
    starts = np.flatnonzero(new.reshape(-1))
    flat = np.arange(rows * length, dtype=np.int64)
    positions = flat - np.repeat(starts, np.diff(starts, append=rows * length))
    positions = positions.astype(np.int32).reshape(rows, length)
    positions *= segment_ids > 0
    return targets, positions


class TokenStore:
    """A complete token store opened for reading.

    Attributes:
      manifest (dict), path, num_rows, seq_len, vocab_size, fingerprint (data
      fingerprint), tokenizer_fingerprint.
    """

    def __init__(self, path: str | os.PathLike):
        self._rows = RowStore(path)
        self.path = Path(path)
        self.manifest = self._rows.manifest
        if self.manifest.get("kind") == "kdjax.example_store":
            raise StoreMismatchError(
                f"{str(path)!r} is an example store (layout examples: one unpacked example "
                "per row, `kdjax pack --layout examples`, what generation reads), not a "
                "token store (layout packed); pack the data with `kdjax pack` (--layout "
                "packed, the default) for training")
        if self.manifest.get("kind") != KIND:
            raise StoreMismatchError(f"{str(path)!r} is not a token store (kind "
                                     f"{self.manifest.get('kind')!r}); pass the path of a "
                                     "store written by `kdjax pack` / build_token_store")
        self.num_rows = int(self.manifest["num_rows"])
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.fingerprint = str(self.manifest["data_fingerprint"])
        self.tokenizer_fingerprint = str(self.manifest["tokenizer_fingerprint"])

    def read(self, rows) -> dict[str, np.ndarray]:
        """Rows as `{tokens, targets, segment_ids, positions: int32, loss_mask: bool}`,
        each `[len(rows), seq_len]`, in one batched read."""
        raw = self._rows.read(rows)
        targets, positions = targets_positions(raw["tokens"], raw["segment_ids"])
        return {"tokens": raw["tokens"].astype(np.int32), "targets": targets,
                "loss_mask": raw["loss_mask"].astype(bool, copy=False),
                "segment_ids": raw["segment_ids"].astype(np.int32), "positions": positions}

    def check(self) -> list[str]:
        """Reads every chunk; one message per damaged chunk (empty when intact)."""
        return self._rows.check()

    def check_tokenizer(self, tokenizer, *, whose: str = "the run's",
                        advice: str | None = None) -> None:
        """Raises StoreMismatchError unless `tokenizer` (a HF tokenizer or a fingerprint
        string) is the one the store was packed with; the message names both fingerprints
        and vocabulary sizes (`whose`: how to call the other tokenizer's owner)."""
        from kdjax.data.tokenize import tokenizer_fingerprint

        fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
        if fp == self.tokenizer_fingerprint:
            return
        size = "" if isinstance(tokenizer, str) else f", vocabulary {len(tokenizer)}"
        advice = advice or ("re-pack the data with this tokenizer or use the tokenizer it "
                            "was packed with")
        raise StoreMismatchError(
            f"token store {str(self.path)!r} was packed with another tokenizer than "
            f"{whose}: tokenizer fingerprint {self.tokenizer_fingerprint[:16]}…, vocabulary "
            f"{self.vocab_size} (the token store's) vs {fp[:16]}…{size} ({whose}). "
            f"{advice[0].upper() + advice[1:]}")

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, rows={self.num_rows}, seq_len={self.seq_len}, "
                f"vocab={self.vocab_size}, data={self.fingerprint[:12]})")


def open_token_store(path: str | os.PathLike, split: str | None = None) -> TokenStore:
    """Opens a token store. `path` is the store itself, or (with `split`, e.g. "train" or
    "eval") the output directory of build_token_store holding one store per split."""
    return TokenStore(split_dir(path, split, "open_token_store"))


def split_dir(path: str | os.PathLike, split: str | None, opener: str) -> Path:
    """The store directory `path` (or `path/split`); a directory of splits opened without
    `split` is an error naming them and how to open one with `opener`."""
    path = Path(path) if split is None else Path(path) / split
    if split is None and not (path / "manifest.json").exists() and (path / "train").is_dir():
        raise StoreIncompleteError(f"{str(path)!r} holds the splits "
                                   f"{sorted(p.name for p in path.iterdir() if p.is_dir())}; "
                                   f"open one of them, e.g. {opener}(path, 'train')")
    return path
