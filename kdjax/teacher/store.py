"""The teacher-signal store: layout, manifest, reader and compatibility checks.

A store is a directory (docs/stores.md, "Teacher store"):

    manifest.json   store_format/version, mode, K/U/N, temperature, teacher/tokenizer/data
                    fingerprints, vocab size, L, rows, shard size, arrays, stats, `complete`
    ledger/         one marker per committed shard (kdjax.storage.ShardLedger)
    arrays/tokens, arrays/loss_mask     [S, L] the token-store rows the signal belongs to
    sampled: arrays/ids, arrays/counts  [S, L, U]   (N draws per position at temperature T)
    topk:    arrays/ids, arrays/logprobs [S, L, K], arrays/tail [S, L] (Σ p outside top-k)
    dense:   arrays/logits              [S, L, V]
    arrays/hidden_<layer>               [S, L, H] optional teacher hidden states

It is a kdjax.storage row store (zarr3 arrays with crc32c chunks, sharded by `shard_rows`
rows, missing chunks are errors, atomic manifest, shard ledger, writer lock) whose
manifest carries the teacher fields above. Row i belongs to row i of the token store.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from kdjax.storage.dtypes import id_dtype
from kdjax.storage.errors import StoreMismatchError
from kdjax.storage.rowstore import RowStore
from kdjax.teacher.signal import MODES, count_dtype

FORMAT = "kdjax.teacher_store"
FORMAT_VERSION = 1

# arrays each mode's loss reads; `read()` returns these (+ hidden_*) unless asked otherwise
LOSS_ARRAYS = {"sampled": ("ids", "counts"), "topk": ("ids", "logprobs"), "dense": ("logits",)}


def array_layout(*, mode: str, seq_len: int, vocab_size: int, k: int = 0,
                 num_samples: int = 0, num_slots: int = 0, logprob_dtype: str = "float32",
                 dense_dtype: str = "float32", hidden_layers=(), hidden_size: int = 0,
                 hidden_dtype: str = "bfloat16") -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (row shape, dtype name)} for a store of `mode` (each array is
    `[num_rows, *row_shape]`), as `kdjax.storage.RowStoreWriter(arrays=...)` takes it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    length, ids = int(seq_len), id_dtype(vocab_size).name
    out = {"tokens": ((length,), ids), "loss_mask": ((length,), "bool")}
    if mode == "sampled":
        if num_samples < 1 or num_slots < 1:
            raise ValueError(f"sampled mode needs num_samples >= 1 and num_slots >= 1, got "
                             f"num_samples={num_samples}, num_slots={num_slots}")
        out["ids"] = ((length, num_slots), ids)
        out["counts"] = ((length, num_slots), count_dtype(num_samples).name)
    elif mode == "topk":
        if not 1 <= k <= vocab_size:
            raise ValueError(f"topk mode needs 1 <= k <= vocab_size ({vocab_size}), got k={k}")
        out["ids"] = ((length, k), ids)
        out["logprobs"] = ((length, k), np.dtype(logprob_dtype).name)
        out["tail"] = ((length,), "float32")
    else:
        out["logits"] = ((length, vocab_size), np.dtype(dense_dtype).name)
    for layer in hidden_layers:
        out[f"hidden_{int(layer)}"] = ((length, int(hidden_size)),
                                       np.dtype(hidden_dtype).name)
    return out


def signal_bytes_per_token(manifest: dict) -> float:
    """Bytes per token of the teacher signal (every array except tokens/loss_mask)."""
    total = 0
    for name, a in manifest["arrays"].items():
        if name not in ("tokens", "loss_mask"):
            total += np.dtype(a["dtype"]).itemsize * int(np.prod(a["shape"][1:], dtype=np.int64))
    return float(total)


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under `path` (the store's size on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# what a difference in each manifest field means, in the order they are checked
_CAUSES = {
    "tokenizer_fingerprint": "it was computed on tokens from another tokenizer",
    "tokenizer_vocab_size": "it was computed on tokens from another vocabulary",
    "vocab_size": "",  # the run's (student's) vocabulary: `_check_vocab`
    "seq_len": "it was computed on rows of another sequence length",
    "data_fingerprint": "it was computed on other data (same tokenizer and sequence length)",
    "num_rows": "it was computed on another number of rows",
}


def _short(value) -> str:
    """A manifest value for a message: fingerprints cut to 16 hex digits."""
    if isinstance(value, str) and len(value) > 24:
        return repr(value[:16] + "…")
    return repr(value)


class TeacherStore:
    """Reader of a complete teacher store (use `open_teacher_store`)."""

    def __init__(self, path: str | os.PathLike, *, require_complete: bool = True):
        self.path = Path(path)
        self.rows = RowStore(self.path, require_complete=require_complete)
        self.manifest = self.rows.manifest
        if self.manifest.get("store_format") != FORMAT:
            raise StoreMismatchError(
                f"{str(self.path)!r} is not a teacher store (store_format "
                f"{self.manifest.get('store_format')!r}, expected {FORMAT!r}); pass the "
                "directory `kdjax precompute` wrote")
        version = self.manifest.get("store_format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"teacher store {str(self.path)!r} has store_format_version {version!r}, this "
                f"kdjax reads {FORMAT_VERSION}; re-run `kdjax precompute` with this version")
        self.arrays = self.rows.arrays

    mode = property(lambda self: self.manifest["mode"])
    num_rows = property(lambda self: int(self.manifest["num_rows"]))
    seq_len = property(lambda self: int(self.manifest["seq_len"]))
    vocab_size = property(lambda self: int(self.manifest["vocab_size"]))
    hidden_layers = property(lambda self: tuple(self.manifest.get("hidden_layers", ())))

    def default_arrays(self) -> tuple[str, ...]:
        return LOSS_ARRAYS[self.mode] + tuple(f"hidden_{h}" for h in self.hidden_layers)

    def read(self, rows, arrays=None) -> dict[str, np.ndarray]:
        """Reads `rows` (1-D ints; any order) in one batched read.

        Returns {name: [len(rows), L, ...]}: sampled `ids, counts`; topk `ids, logprobs`;
        dense `logits`; plus `hidden_<layer>` — or exactly the `arrays` named (any of
        `self.arrays`, e.g. "tail", "tokens", "loss_mask"). Ids are the stored unsigned
        dtype; `teacher_from_batch` converts them for the losses.

        Raises:
          StoreCorruptError: a chunk is missing/truncated/fails crc32c (names array, chunk).
          IndexError: a row outside [0, num_rows).
        """
        rows = np.asarray(rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows must lie in [0, {self.num_rows}) for store "
                             f"{str(self.path)!r}, got [{rows.min()}, {rows.max()}]")
        names = self.default_arrays() if arrays is None else tuple(arrays)
        unknown = [n for n in names if n not in self.arrays]
        if unknown:
            raise KeyError(f"store {str(self.path)!r} has no array(s) {unknown}; it has "
                           f"{sorted(self.arrays)}")
        return self.rows.read(rows, names)

    def check_compatible(self, token_store=None, *, vocab_size: int | None = None,
                         seq_len: int | None = None, tokenizer_fingerprint: str | None = None,
                         data_fingerprint: str | None = None) -> None:
        """Refuses (StoreMismatchError) a store that does not belong to this run, naming the
        concrete cause first: the tokenizer, the vocabulary (the token store's, then the
        run's / student's), the sequence length, and only then the data (fingerprint and
        row count), with both values.

        A student vocabulary other than the teacher's is accepted only where the losses
        stay exact: it must hold the tokenizer's ids, and every stored id (top-k/sampled)
        or, for dense stores, be at most the teacher's (extra teacher columns are masked).
        """
        want = {}
        if token_store is not None:
            want.update(tokenizer_fingerprint=token_store.tokenizer_fingerprint,
                        tokenizer_vocab_size=int(token_store.vocab_size),
                        seq_len=int(token_store.seq_len),
                        data_fingerprint=token_store.fingerprint,
                        num_rows=int(token_store.num_rows))
        given = dict(tokenizer_fingerprint=tokenizer_fingerprint, seq_len=seq_len,
                     data_fingerprint=data_fingerprint)
        want.update({k: v for k, v in given.items() if v is not None})
        for field in _CAUSES:  # in this order: the first difference is the cause
            if field == "vocab_size":
                if vocab_size is not None:
                    self._check_vocab(int(vocab_size))
                continue
            unrecorded = field == "tokenizer_vocab_size" and field not in self.manifest
            if field not in want or unrecorded:  # (stores written before it was recorded)
                continue
            have, expected = self.manifest.get(field), want[field]
            if have != expected:
                where = (f" (token store {str(token_store.path)!r})"
                         if token_store is not None else "")
                if field == "tokenizer_fingerprint" and token_store is not None:
                    where += (f"; vocabulary {self.manifest.get('tokenizer_vocab_size')} vs "
                              f"{token_store.vocab_size}")
                raise StoreMismatchError(
                    f"teacher store {str(self.path)!r} does not match this run: "
                    f"{_CAUSES[field]}: its {field} is {_short(have)} but the run has "
                    f"{_short(expected)}{where}. Re-run `kdjax precompute` for this token "
                    "store/teacher, or point the run at the matching store")

    def _check_vocab(self, v: int) -> None:
        m = self.manifest
        have = int(m["vocab_size"])
        if v == have:
            return
        tok = int(m.get("tokenizer_vocab_size", have))
        max_id = int(m.get("stats", {}).get("max_id", have - 1))
        ok = tok <= v <= have if m["mode"] == "dense" else v >= tok and v > max_id
        if not ok:
            need = (f"between the tokenizer's {tok} and the teacher's {have}"
                    if m["mode"] == "dense" else f"at least {max(tok, max_id + 1)}")
            raise StoreMismatchError(
                f"teacher store {str(self.path)!r} does not match this run: its vocab_size is "
                f"{have} but the run has {v} (a {m['mode']} store needs a vocabulary "
                f"{need}: tokenizer size {tok}, largest stored id {max_id}). Use the "
                "student/tokenizer the store was built for")


def open_teacher_store(path: str | os.PathLike, *, require_complete: bool = True
                       ) -> TeacherStore:
    """Opens a teacher store for reading; an incomplete store is refused (StoreIncompleteError)
    unless `require_complete=False` (for `kdjax inspect`)."""
    return TeacherStore(path, require_complete=require_complete)
