"""Whole-shard writes of kdjax's row-sharded zarr3 arrays with `writev`: the counterpart of
`shardread`.

tensorstore encodes a shard through several buffer copies; on a small host it writes a
dense-logits shard with CPU time that a teacher precompute pays on the cores that run
the teacher. For arrays in exactly the layout `arrays.array_spec` creates with one row
per inner chunk, this writer produces the same bytes itself: every row followed by its
crc32c (computed in place on the caller's arrays), then the shard index ((offset, nbytes)
little-endian uint64 per inner chunk, all-ones for chunks past the last row) and its
crc32c — one `writev` per 512 rows, no copies but the kernel's (benchmarks/
results/precompute.md measures the write path). Like tensorstore's file kvstore, it writes a
temporary file in the shard's directory, fsyncs it, renames it over the shard file and
fsyncs the directory: a crash leaves the old shard file or the new one, never a
half-written one (and the ledger only records a shard after this returns).

zarr v3 sharding codec: https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from kdjax.storage import shardread

_MISSING = 2**64 - 1  # index entry (offset, nbytes) of a chunk that is not stored
_IOV_ROWS = 512  # rows per writev (2 buffers each; IOV_MAX is 1024 on Linux)
_TMP = ".kdjax-tmp-"


class ShardWriter:
    """Writes whole shards of one array created by `arrays.create_array` (chunk_rows 1).

    Use `ShardWriter.of(array)`, which returns None for arrays it cannot write.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, shard_rows: int):
        self.path, self.shape, self.dtype, self.shard_rows = path, shape, dtype, shard_rows
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    @classmethod
    def of(cls, array: ts.TensorStore) -> ShardWriter | None:
        """A writer for `array`, or None unless it has kdjax's layout with one row per
        inner chunk and google-crc32c can checksum NumPy arrays in place."""
        layout = shardread.layout_of(array) if _enabled() else None
        if layout is None or layout[4] != 1 or not hasattr(os, "writev"):
            return None
        return cls(*layout[:4])

    def file_of(self, shard: int) -> str:
        return shardread.shard_file(self.path, len(self.shape), shard)

    def write(self, shard: int, parts: Sequence[np.ndarray]) -> None:
        """Writes shard `shard` from `parts`, arrays `[n_i, *shape[1:]]` of this array's
        dtype whose concatenation is the shard's rows (all of them: `shard_rows`, fewer in
        the last shard), and makes it durable."""
        lo = shard * self.shard_rows
        rows = min(self.shard_rows, self.shape[0] - lo)
        parts = [np.ascontiguousarray(p) for p in parts]
        got = sum(len(p) for p in parts)
        if shard < 0 or rows < 1 or got != rows:
            raise ValueError(f"shard {shard} of {self.path!r} needs {max(rows, 0)} rows, got "
                             f"{got}")
        for p in parts:
            if p.dtype != self.dtype or p.shape[1:] != self.shape[1:]:
                raise ValueError(f"parts of {self.path!r} must be {self.dtype} "
                                 f"[n, {', '.join(map(str, self.shape[1:]))}], got {p.dtype} "
                                 f"{list(p.shape)}")
        views = [r for p in parts for r in p.reshape(len(p), self.row_bytes // p.itemsize)
                 .view(np.uint8)]
        crc = shardread._crc_any
        crcs = struct.pack(f"<{rows}I", *map(crc, views))
        want = self.row_bytes + 4
        index = np.full((self.shard_rows, 2), _MISSING, "<u8")
        index[:rows, 0] = np.arange(rows, dtype=np.uint64) * want
        index[:rows, 1] = want
        index_bytes = index.tobytes()
        index_bytes += struct.pack("<I", crc(index_bytes))
        slots = memoryview(crcs)
        buffers = [b for i, v in enumerate(views) for b in (v, slots[4 * i:4 * i + 4])]
        buffers.append(index_bytes)
        _write_atomic(self.file_of(shard), buffers)


def _enabled() -> bool:
    """The fast path: a zero-copy crc32c and KDJAX_FAST_WRITE not "0" (then every write
    goes through tensorstore)."""
    return shardread._crc_any is not None and os.environ.get("KDJAX_FAST_WRITE", "1") != "0"


def _write_atomic(file: str, buffers: list) -> None:
    """`file` := the concatenation of `buffers`, via a fsynced temporary file renamed over
    it (then the directory fsynced). Temporaries left by a killed writer are removed."""
    directory, name = os.path.split(file)
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(glob.escape(os.path.join(directory, f".{name}{_TMP}")) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    tmp = os.path.join(directory, f".{name}{_TMP}{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            for k in range(0, len(buffers), 2 * _IOV_ROWS):
                _writev_all(fd, buffers[k:k + 2 * _IOV_ROWS])
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                # written once, read by a later run: keeping it cached would evict what
                # the writer reads (the token store) and made dense
                # precompute on a 2-core VM (kernel page-cache upkeep)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _writev_all(fd: int, buffers: list) -> None:
    """`writev` that finishes a short write (a signal, a full pipe) with plain writes."""
    views = [memoryview(b).cast("B") for b in buffers]
    done = os.writev(fd, views)
    for v in views:
        if done >= len(v):
            done -= len(v)
            continue
        rest = v[done:]
        while len(rest):
            rest = rest[os.write(fd, rest):]
        done = 0
