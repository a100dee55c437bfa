"""The "record" row layout: all of a row's arrays in one uint8 zarr array.

A row store normally keeps one zarr array per named array, so reading a row costs one
chunk read per array. In the record layout every row is one byte record (the arrays'
bytes, little-endian, each at an 8-byte-aligned offset) in a single `records [S, B]`
uint8 array: one chunk (one crc32c, one read) per row whatever the number of arrays,
which roughly halves the cost of random row reads of small rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

RECORDS = "records"
_ALIGN = 8


def record_fields(layout: Mapping[str, Mapping]) -> tuple[dict[str, dict], int]:
    """({name: {offset, nbytes, shape, dtype}}, row_bytes) for a manifest `arrays` layout
    ({name: {"shape": [...], "dtype": "uint16"}}), names in sorted order."""
    fields, offset = {}, 0
    for name in sorted(layout):
        shape, dtype = tuple(layout[name]["shape"]), np.dtype(layout[name]["dtype"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        fields[name] = {"offset": offset, "nbytes": nbytes, "shape": shape, "dtype": dtype}
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return fields, max(offset, 1)


def pack_records(values: Mapping[str, np.ndarray], fields: Mapping[str, dict],
                 row_bytes: int) -> np.ndarray:
    """[n, row_bytes] uint8 records from {name: [n, *shape]} arrays (already in their
    stored dtypes)."""
    n = len(next(iter(values.values())))
    out = np.zeros((n, row_bytes), np.uint8)
    for name, f in fields.items():
        v = np.ascontiguousarray(values[name], dtype=f["dtype"].newbyteorder("<"))
        out[:, f["offset"]:f["offset"] + f["nbytes"]] = v.reshape(n, -1).view(np.uint8)
    return out


def unpack_records(records: np.ndarray, fields: Mapping[str, dict],
                   names: Iterable[str]) -> dict[str, np.ndarray]:
    """{name: [n, *shape]} (stored dtypes) from [n, row_bytes] uint8 records."""
    n = len(records)
    out = {}
    for name in names:
        f = fields[name]
        raw = np.ascontiguousarray(records[:, f["offset"]:f["offset"] + f["nbytes"]])
        out[name] = raw.view(f["dtype"].newbyteorder("<")).astype(f["dtype"], copy=False) \
            .reshape(n, *f["shape"])
    return out
