"""A row store: named row-sharded arrays + a manifest + a shard ledger + a writer lock.

Both the token store (kdjax.data) and the teacher store (kdjax.teacher) are row stores.
Writing: `RowStoreWriter` takes the writer lock, writes `manifest.json` with
`complete: false` and a fingerprint of the plan (arrays, rows, shards and the caller's
metadata), writes whole shards (`write_shard`) and records each in the ledger, and
finally (`finalize`) rewrites the manifest with `complete: true`. Re-running with the
same plan resumes (only `missing_shards()` remain); a different plan is refused unless
`overwrite=True`. Reading: `open_row_store` refuses incomplete stores and checks every
array against the manifest; `RowStore.read(rows)` reads the rows of all arrays
(`arrays.read_rows`: the fast pread + crc32c reader for kdjax's layout).

`layout="arrays"` (default) keeps one zarr array per name; `layout="record"` keeps each
row's arrays in one byte record (kdjax.storage.records: one chunk read per row).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

from kdjax.storage.arrays import (
    check_array,
    create_array,
    open_array,
    read_rows,
    row_readers,
    write_rows,
)
from kdjax.storage.dtypes import cast_checked
from kdjax.storage.errors import StoreCorruptError, StoreIncompleteError, StoreMismatchError
from kdjax.storage.fingerprint import fingerprint_json
from kdjax.storage.ledger import LEDGER_DIR, ShardLedger
from kdjax.storage.lock import WriterLock
from kdjax.storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from kdjax.storage.records import RECORDS, pack_records, record_fields, unpack_records
from kdjax.storage.shardwrite import ShardWriter

FORMAT = "kdjax.rowstore"
FORMAT_VERSION = 1
ARRAYS_DIR = "arrays"


def _layout(arrays: Mapping[str, tuple[Sequence[int], object]]) -> dict:
    return {name: {"shape": [int(s) for s in shape], "dtype": np.dtype(dt).name}
            for name, (shape, dt) in sorted(arrays.items())}


class RowStoreWriter:
    """Writes a row store shard by shard, resumably.

    Args:
      path: store directory.
      arrays: {name: (row_shape, dtype)} — each array is `[num_rows, *row_shape]`.
      num_rows: rows in the store; shard_rows: rows per shard (the commit unit);
      chunk_rows: rows per crc32c inner chunk (the random-read unit).
      metadata: caller's manifest fields that define the content (fingerprints, mode, …);
        part of the plan, so a rerun with different metadata is refused.
      overwrite: delete an existing store with a different plan instead of refusing.
      lock_name: writer-lock name; one per process of a multi-process writer.
      layout: "arrays" (one zarr array per name) or "record" (one byte record per row).
    """

    def __init__(self, path: str | os.PathLike, *, arrays: Mapping[str, tuple], num_rows: int,
                 shard_rows: int, chunk_rows: int = 1, metadata: Mapping | None = None,
                 overwrite: bool = False, lock_name: str = "writer", layout: str = "arrays"):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if layout not in ("arrays", "record"):
            raise ValueError(f"layout must be 'arrays' or 'record', got {layout!r}")
        self.path = Path(path)
        self.num_rows, self.shard_rows = int(num_rows), int(shard_rows)
        self.row_shapes = {k: tuple(int(s) for s in v[0]) for k, v in arrays.items()}
        self.dtypes = {k: np.dtype(v[1]) for k, v in arrays.items()}
        plan = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "num_rows": self.num_rows, "shard_rows": self.shard_rows,
                "chunk_rows": int(chunk_rows), "arrays": _layout(arrays), **(metadata or {})}
        if layout == "record":  # (absent for "arrays", so older plans keep their fingerprint)
            plan["layout"] = "record"
        plan["plan_fingerprint"] = fingerprint_json(plan)
        self.fields, row_bytes = record_fields(plan["arrays"])
        self.record = layout == "record"
        shapes = ({RECORDS: ((row_bytes,), np.dtype(np.uint8))} if self.record else
                  {k: (self.row_shapes[k], self.dtypes[k]) for k in self.row_shapes})
        self.row_bytes = row_bytes
        self.lock = WriterLock(self.path, lock_name).acquire()
        try:
            self.manifest = self._start(plan, overwrite)
            self.num_shards = -(-self.num_rows // self.shard_rows)
            self.ledger = ShardLedger(self.path, self.num_shards)
            ctx = ts.Context()
            self.arrays = {
                name: create_array(self.path / ARRAYS_DIR / name, shape=(self.num_rows, *shape),
                                   dtype=dtype, shard_rows=self.shard_rows,
                                   chunk_rows=chunk_rows, context=ctx)
                for name, (shape, dtype) in shapes.items()}
            # whole-shard writes without tensorstore's copies (kdjax.storage.shardwrite)
            self._writers = {name: ShardWriter.of(arr) for name, arr in self.arrays.items()}
        except BaseException:
            self.lock.release()
            raise

    def _start(self, plan: dict, overwrite: bool) -> dict:
        try:
            old = read_manifest(self.path, require_complete=False)
        except StoreIncompleteError:
            old = None
        if old is not None and old.get("plan_fingerprint") != plan["plan_fingerprint"]:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(plan) if k not in ("complete",
                              "plan_fingerprint") and k in plan and old.get(k) != plan.get(k))
                raise StoreMismatchError(
                    f"store {str(self.path)!r} was started with a different plan (differs "
                    f"in: {', '.join(diff) or 'unknown'}); delete it, write elsewhere, or "
                    "pass overwrite=True (`--overwrite` on the command line)")
            for sub in (ARRAYS_DIR, LEDGER_DIR):
                shutil.rmtree(self.path / sub, ignore_errors=True)
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)
            old = None
        if old is not None:
            return old
        manifest = {**plan, "complete": False}
        write_manifest(self.path, manifest)
        return manifest

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows [lo, hi) of `shard`."""
        lo = int(shard) * self.shard_rows
        return lo, min(lo + self.shard_rows, self.num_rows)

    def missing_shards(self) -> list[int]:
        return self.ledger.missing()

    def write_shard(self, shard: int, data: Mapping[str, np.ndarray | Sequence[np.ndarray]],
                    info: dict | None = None):
        """Writes every array's rows of `shard` (each `[hi - lo, *row_shape]`, or a list of
        arrays whose concatenation along rows is that), then records the shard in the
        ledger with `info` (e.g. per-shard statistics)."""
        lo, hi = self.shard_range(shard)
        if set(data) != set(self.row_shapes):
            raise ValueError(f"write_shard needs exactly the arrays {sorted(self.row_shapes)}, "
                             f"got {sorted(data)}")
        values = {}
        for name, v in data.items():
            parts = list(v) if isinstance(v, (list, tuple)) else [v]
            shapes = [tuple(np.shape(p)) for p in parts]
            want = (hi - lo, *self.row_shapes[name])
            if (any(len(s) != len(want) or s[1:] != want[1:] for s in shapes)
                    or sum(s[0] for s in shapes) != want[0]):
                got = shapes[0] if len(shapes) == 1 else f"parts {shapes}"
                raise ValueError(f"array {name!r} for shard {shard} (rows [{lo}, {hi})) must "
                                 f"have shape {want}, got {got}")
            values[name] = [cast_checked(p, self.dtypes[name], name=name) for p in parts]
        if self.record:
            values = {RECORDS: [pack_records({k: _joined(v) for k, v in values.items()},
                                             self.fields, self.row_bytes)]}
        slow = {}
        for name, parts in values.items():
            if (writer := self._writers[name]) is not None:
                writer.write(shard, parts)  # durable when it returns
            else:
                slow[name] = _joined(parts)
        write_rows(self.arrays, lo, slow)
        self.ledger.record(shard, info)

    def finalize(self, extra: Mapping | None = None) -> dict:
        """Marks the store complete (after checking the ledger) and returns the manifest.
        `extra` (statistics) is added to the manifest; it is not part of the plan."""
        if missing := self.ledger.missing():
            raise StoreIncompleteError(
                f"cannot finalize store {str(self.path)!r}: {len(missing)} of "
                f"{self.num_shards} shards are not written (first: {missing[:8]}); write "
                "them (other processes may still be running) and finalize again")
        self.manifest = {**self.manifest, **(extra or {}), "complete": True}
        write_manifest(self.path, self.manifest)
        return self.manifest

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> RowStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowStore:
    """A complete row store opened for reading (see `open_row_store`)."""

    def __init__(self, path: str | os.PathLike, *, require_complete: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, require_complete=require_complete)
        if self.manifest.get("format") != FORMAT:
            raise StoreCorruptError(f"{str(self.path)!r} is not a kdjax row store "
                                    f"(format {self.manifest.get('format')!r})")
        self.num_rows = int(self.manifest["num_rows"])
        self.fields, row_bytes = record_fields(self.manifest["arrays"])
        self.record = self.manifest.get("layout", "arrays") == "record"
        shapes = ({RECORDS: {"shape": [row_bytes], "dtype": "uint8"}} if self.record
                  else self.manifest["arrays"])
        ctx = ts.Context()
        self.arrays = {}  # the zarr arrays on disk (one "records" array in record layout)
        for name, spec in shapes.items():
            arr = open_array(self.path / ARRAYS_DIR / name, context=ctx)
            want = (self.num_rows, *spec["shape"])
            if tuple(arr.shape) != want or arr.dtype.numpy_dtype != np.dtype(spec["dtype"]):
                raise StoreCorruptError(
                    f"array {name!r} of store {str(self.path)!r} is {arr.dtype.name} "
                    f"{list(arr.shape)} but the manifest says {spec['dtype']} {list(want)}; "
                    "the store is truncated or mixed up — rebuild it")
            self.arrays[name] = arr
        self._readers = row_readers(self.arrays)  # fast pread + crc32c path (shardread)

    @property
    def names(self) -> list[str]:
        """The logical arrays a row holds (what `read` returns)."""
        return list(self.manifest["arrays"])

    def read(self, rows, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{name: [len(rows), *row_shape]} for `rows` (1-D ints in [0, num_rows))."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise TypeError(f"rows must be a 1-D integer array, got {rows.dtype} "
                            f"{rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows must lie in [0, {self.num_rows}) for store "
                             f"{str(self.path)!r}; got values in [{rows.min()}, {rows.max()}]")
        names = self.names if names is None else list(names)
        if unknown := [n for n in names if n not in self.fields]:
            raise KeyError(f"store {str(self.path)!r} has no array(s) {unknown}; it has "
                           f"{self.names}")
        if self.record:  # errors then name the record array and the arrays it holds
            label = f"{RECORDS} (holding {', '.join(self.names)})"
            records = read_rows({label: self.arrays[RECORDS]}, rows,
                                readers={label: self._readers[RECORDS]})[label]
            return unpack_records(records, self.fields, names)
        return read_rows({n: self.arrays[n] for n in names}, rows, readers=self._readers)

    def check(self) -> list[str]:
        """Reads every chunk of every array; returns a message per damaged chunk."""
        return [p for name, arr in self.arrays.items() for p in check_array(arr, name=name)]


def open_row_store(path: str | os.PathLike) -> RowStore:
    """Opens a complete row store for reading (incomplete → StoreIncompleteError)."""
    return RowStore(path)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
