"""zarr3 arrays through tensorstore, row-sharded, with crc32c on every chunk.

Layout: axis 0 is the row axis. Rows are grouped into shards of `shard_rows` rows (one
file each, the unit a writer commits); inside a shard every `chunk_rows` rows form an
inner chunk with its own crc32c, so a random row read fetches only its bytes. Arrays are
created with `store_data_equal_to_fill_value` (every chunk is stored, even all-zero
ones) and opened with `fill_missing_data_reads: false`, so a missing chunk is an error,
never silently read as zeros. tensorstore's `file` kvstore writes each shard to a
temporary file and renames it, so a shard file is never half-written.

Reading rows (`read_rows`): arrays in exactly this layout are decoded by
`kdjax.storage.shardread` (pread + crc32c on the calling thread, faster than tensorstore
for random rows, same checks and errors); anything else, or every array when
KDJAX_FAST_READ=0, goes through tensorstore. Writing whole shards
(`RowStoreWriter.write_shard`): arrays with one row per inner chunk are encoded by
`kdjax.storage.shardwrite` (the same bytes as tensorstore, writev + crc32c in place, same
temporary-file-and-rename atomicity); others, or all with KDJAX_FAST_WRITE=0, by
tensorstore.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

from kdjax.storage.errors import StoreCorruptError, StoreMismatchError
from kdjax.storage.shardread import ShardReadError, ShardRowReader

_CRC_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_FILE_RE = re.compile(r'local file "([^"]+)"')
_CODE_RE = re.compile(r"^([A-Z_]+):")


def array_spec(path: str | os.PathLike, *, shape: Sequence[int], dtype,
               shard_rows: int, chunk_rows: int = 1) -> dict:
    """tensorstore spec (JSON) of a row-sharded zarr3 array with crc32c chunks."""
    shape = [int(s) for s in shape]
    if not shape:
        raise ValueError("an array needs at least the row axis; got shape ()")
    if shard_rows < 1 or chunk_rows < 1 or shard_rows % chunk_rows:
        raise ValueError(f"shard_rows ({shard_rows}) must be a positive multiple of "
                         f"chunk_rows ({chunk_rows})")
    rest = [max(s, 1) for s in shape[1:]]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(Path(path).absolute())},
        "store_data_equal_to_fill_value": True,
        "fill_missing_data_reads": False,
        "metadata": {
            "shape": shape,
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular",
                           "configuration": {"chunk_shape": [int(shard_rows), *rest]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [int(chunk_rows), *rest],
                "codecs": _CRC_CODECS,
                "index_codecs": _CRC_CODECS,
            }}],
        },
    }


def create_array(path: str | os.PathLike, *, shape: Sequence[int], dtype, shard_rows: int,
                 chunk_rows: int = 1, context: ts.Context | None = None) -> ts.TensorStore:
    """Creates the array, or opens it if it already exists with the same metadata (so a
    resumed writer reuses it). Different existing metadata → StoreMismatchError."""
    spec = array_spec(path, shape=shape, dtype=dtype, shard_rows=shard_rows,
                      chunk_rows=chunk_rows)
    try:
        return ts.open(spec, open=True, create=True, context=context).result()
    except ValueError as e:
        raise StoreMismatchError(
            f"array {str(path)!r} exists with a different layout than requested "
            f"(shape {list(shape)}, dtype {np.dtype(dtype).name}, shard_rows {shard_rows}, "
            f"chunk_rows {chunk_rows}): {e}. Delete it or write with the same settings"
        ) from None


def open_array(path: str | os.PathLike, *, write: bool = False,
               context: ts.Context | None = None) -> ts.TensorStore:
    """Opens an existing array so that missing chunks raise instead of reading as zeros."""
    spec = {"driver": "zarr3", "fill_missing_data_reads": False,
            "store_data_equal_to_fill_value": True,
            "kvstore": {"driver": "file", "path": str(Path(path).absolute())}}
    try:
        return ts.open(spec, open=True, read=True, write=write, context=context).result()
    except ValueError as e:
        raise StoreCorruptError(f"cannot open array {str(path)!r}: {_without_spec(e)}. The "
                                "store is incomplete or damaged; rebuild it") from None


def _without_spec(err: Exception) -> str:
    """tensorstore's message without the JSON spec it appends (`[tensorstore_spec='…']`),
    which repeats what kdjax's message already says."""
    msg = str(err)
    start = msg.find(" [tensorstore_spec='")
    end = msg.rfind("']")
    return msg[:start] + msg[end + 2:] if 0 <= start < end else msg


def array_path(array: ts.TensorStore) -> str:
    return array.kvstore.path.rstrip("/")


def shard_rows_of(array: ts.TensorStore) -> int:
    return int(array.chunk_layout.write_chunk.shape[0])


def describe_error(array: ts.TensorStore, err: Exception, *, name: str | None = None) -> str:
    """A readable message for a failed read: the array, status code, chunk file, rows."""
    msg = str(err)
    code = m.group(1) if (m := _CODE_RE.match(msg)) else "ERROR"
    path = array_path(array)
    where = ""
    if f := _FILE_RE.search(msg):
        rel = os.path.relpath(f.group(1), path)
        parts = rel.split(os.sep)
        if len(parts) >= 2 and parts[0] == "c" and parts[1].isdigit():
            shard = int(parts[1])
            lo = shard * shard_rows_of(array)
            hi = min(lo + shard_rows_of(array), array.shape[0])
            where = f" in chunk file {rel!r} (shard {shard}, rows [{lo}, {hi}))"
        else:
            where = f" in {rel!r}"
    label = f"array {name!r} ({path})" if name else f"array {path!r}"
    return (f"{code}: reading {label} failed{where}: {msg}. The store is corrupt or "
            "incomplete: rebuild it, or forget that shard in the writer's ledger and "
            "re-run the writer")


def row_readers(arrays: Mapping[str, ts.TensorStore]) -> dict[str, ShardRowReader | None]:
    """The fast row reader of each array (None: read through tensorstore); build once per
    opened store and pass to `read_rows(..., readers=)`."""
    return {name: ShardRowReader.of(arr) for name, arr in arrays.items()}


def read_rows(arrays: Mapping[str, ts.TensorStore], rows: np.ndarray, *,
              readers: Mapping[str, ShardRowReader | None] | None = None
              ) -> dict[str, np.ndarray]:
    """Reads `rows` (1-D ints, any order, repeats allowed) of every array. Returns
    {name: [len(rows), *shape[1:]]} in the order of `rows`.

    Arrays in kdjax's own layout are read by `shardread.ShardRowReader` (pread + crc32c on
    the calling thread, faster than tensorstore for random rows: benchmarks/results/
    loader.md); others in one
    batched tensorstore read, started first so it overlaps the fast reads.

    Raises:
      StoreCorruptError: a chunk is missing, truncated or fails its checksum; the
        message names the array, the chunk file and its rows.
      IndexError: a row outside [0, rows of the array).
    """
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise TypeError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
    readers = row_readers(arrays) if readers is None else readers
    futures = {}
    with ts.Batch() as batch:  # lets tensorstore coalesce reads of one shard
        for name, arr in arrays.items():
            if readers.get(name) is None:
                # index arrays may be unsorted and repeat; tensorstore returns rows in order
                futures[name] = arr.oindex[rows].read(batch=batch)
    out = {}
    for name, arr in arrays.items():
        if (reader := readers.get(name)) is None:
            continue
        n = arr.shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"OUT_OF_RANGE: rows of array {name!r} must lie in [0, {n}), got "
                             f"values in [{rows.min()}, {rows.max()}]")
        try:
            out[name] = reader.read(rows)
        except ShardReadError as e:
            raise StoreCorruptError(describe_error(arr, e, name=name)) from None
    for name, fut in futures.items():
        try:
            out[name] = fut.result()
        except ValueError as e:
            raise StoreCorruptError(describe_error(arrays[name], e, name=name)) from None
    return {name: out[name] for name in arrays}


def write_rows(arrays: Mapping[str, ts.TensorStore], start: int,
               values: Mapping[str, np.ndarray]) -> None:
    """Writes `values[name]` at rows [start, start + n) of each array, all concurrently,
    and waits until every write is durable. Write whole shards (start and n multiples of
    the shard size, except the last shard) so each shard file is written once."""
    futures = [arrays[name][start:start + len(v)].write(v) for name, v in values.items()]
    for fut in futures:
        fut.result()


def check_array(array: ts.TensorStore, *, name: str | None = None) -> list[str]:
    """Reads every shard of `array`; returns one message per unreadable shard (missing,
    truncated or failing crc32c), empty when all chunks are intact."""
    problems = []
    step = shard_rows_of(array)
    inner = int(array.chunk_layout.read_chunk.shape[0])
    n = array.shape[0]
    for lo in range(0, n, step):
        try:
            array[lo:min(lo + step, n)].read().result()
            continue
        except ValueError as e:
            shard_error = e
        bad, starts = [], range(lo, min(lo + step, n), inner)
        for c in starts:  # find the damaged inner chunks
            try:
                array[c:min(c + inner, n)].read().result()
            except ValueError as e:
                bad.append(describe_error(array, e, name=name))
        # a shard whose every chunk fails (missing/truncated file) is one problem
        problems.extend(bad if 0 < len(bad) < len(starts) else
                        [describe_error(array, shard_error, name=name)])
    return problems
