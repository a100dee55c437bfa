"""The fast row reader (kdjax.storage.shardread): same rows as tensorstore, and every kind
of damage (flipped byte in a row or in the shard index, truncation, a lost file, a
missing inner chunk) is an error naming the array, the chunk file and its rows."""

import contextlib
import os

import numpy as np
import pytest
import tensorstore as ts

from kdjax.storage import StoreCorruptError, create_array, open_array, read_rows, shardread
from kdjax.storage.arrays import row_readers

BACKENDS = [b for b, ok in (("zero-copy", shardread._crc_any is not None),
                            ("bytes-only", shardread._crc_bytes is not None)) if ok]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no crc32c module: tensorstore only")


@pytest.fixture(autouse=True)
def fast_read_on(monkeypatch):
    """These tests are about the fast path, whatever KDJAX_FAST_READ the run has."""
    monkeypatch.delenv("KDJAX_FAST_READ", raising=False)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs a test with each crc32c path: rows read and checked in place (google-crc32c
    on NumPy arrays), or read into bytes, checked, then copied."""
    if request.param == "bytes-only":
        monkeypatch.setattr(shardread, "_crc_any", None)
    return request.param


def make(path, rng, *, rows=11, row_shape=(5, 3), dtype=np.uint16, shard_rows=4,
         chunk_rows=1):
    """An array written through tensorstore, its contents, and a fast reader of it."""
    arr = create_array(path, shape=(rows, *row_shape), dtype=dtype, shard_rows=shard_rows,
                       chunk_rows=chunk_rows)
    data = (rng.random((rows, *row_shape)) < 0.5 if dtype is bool else
            rng.integers(0, np.iinfo(dtype).max, (rows, *row_shape), endpoint=True)
            .astype(dtype))
    arr.write(data).result()
    ro = open_array(path)
    reader = shardread.ShardRowReader.of(ro)
    assert reader is not None, "kdjax's own layout must take the fast path"
    return ro, data, reader


@pytest.mark.parametrize("dtype,row_shape,chunk_rows", [
    (np.uint16, (5, 3), 1), (np.uint32, (7,), 2), (bool, (4, 2, 3), 1), (np.uint8, (9,), 4)])
def test_fast_rows_equal_tensorstore_rows(tmp_path, rng, backend, dtype, row_shape,
                                          chunk_rows):
    arr, data, reader = make(tmp_path / "a", rng, dtype=dtype, row_shape=row_shape,
                             shard_rows=4, chunk_rows=chunk_rows)
    for rows in (rng.integers(0, 11, 17), np.array([10, 0, 10, 3, 4]), np.arange(11)[::-1],
                 np.zeros(0, np.int64)):
        got = reader.read(rows)
        assert got.dtype == data.dtype and got.shape == (len(rows), *row_shape)
        np.testing.assert_array_equal(got, data[rows])
        np.testing.assert_array_equal(got, arr.oindex[rows].read().result())
        np.testing.assert_array_equal(read_rows({"a": arr}, rows)["a"], data[rows])
    with pytest.raises(IndexError, match=r"\[0, 11\).*\[3, 11\]"):
        read_rows({"a": arr}, np.array([3, 11]))


def test_other_layouts_and_opt_out_use_tensorstore(tmp_path, rng, monkeypatch):
    arr, data, _ = make(tmp_path / "a", rng)
    plain = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                     "path": str(tmp_path / "plain")},
                     "metadata": {"shape": [6, 2], "data_type": "uint8"}},
                    create=True).result()  # no sharding, no crc32c: not ours to decode
    assert shardread.ShardRowReader.of(plain) is None
    monkeypatch.setenv("KDJAX_FAST_READ", "0")
    assert row_readers({"a": arr}) == {"a": None}
    np.testing.assert_array_equal(read_rows({"a": arr}, np.array([2, 9]))["a"], data[[2, 9]])


def damage_and_read(arr, reader, rows):
    """The StoreCorruptError message of reading `rows`, checked to come from the fast
    path (the reader's own error, wrapped)."""
    with pytest.raises(shardread.ShardReadError):
        reader.read(rows)
    with pytest.raises(StoreCorruptError) as err:
        read_rows({"ids": arr}, rows, readers={"ids": reader})
    return str(err.value)


def test_flipped_row_byte_is_data_loss_naming_array_chunk_and_rows(tmp_path, rng, backend):
    arr, data, reader = make(tmp_path / "ids", rng)
    f = tmp_path / "ids" / "c" / "1" / "0" / "0"
    blob = bytearray(f.read_bytes())
    blob[(5 * 3 * 2 + 4) + 7] ^= 0x04  # inside the second inner chunk = row 5
    f.write_bytes(bytes(blob))
    np.testing.assert_array_equal(reader.read(np.array([4, 6, 9])), data[[4, 6, 9]])
    msg = damage_and_read(arr, reader, np.array([0, 5]))
    assert "DATA_LOSS" in msg and "'ids'" in msg and "c/1/0/0" in msg and "Digest" in msg
    assert "shard 1, rows [4, 8)" in msg and "row 5" in msg


def test_corrupt_index_truncation_and_lost_file(tmp_path, rng, backend):
    arr, data, reader = make(tmp_path / "ids", rng)
    f = tmp_path / "ids" / "c" / "2" / "0" / "0"
    blob = f.read_bytes()
    f.write_bytes(blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:])  # inside the index
    msg = damage_and_read(arr, reader, np.array([8]))
    assert "DATA_LOSS" in msg and "index" in msg and "shard 2, rows [8, 11)" in msg
    f.write_bytes(blob[: len(blob) // 2])  # truncated: index gone
    msg = damage_and_read(arr, reader, np.array([9]))
    assert "DATA_LOSS" in msg and "truncated" in msg and "shard 2" in msg
    os.remove(f)
    msg = damage_and_read(arr, reader, np.array([1, 10]))
    assert "NOT_FOUND" in msg and "c/2/0/0" in msg and "shard 2, rows [8, 11)" in msg
    np.testing.assert_array_equal(reader.read(np.array([1, 7])), data[[1, 7]])


def test_missing_inner_chunk_and_bad_index_entry(tmp_path, rng, backend):
    import google_crc32c

    arr, data, reader = make(tmp_path / "ids", rng)
    f = tmp_path / "ids" / "c" / "0" / "0" / "0"
    blob = f.read_bytes()
    index = np.frombuffer(blob[-(4 * 16 + 4):-4], "<u8").reshape(4, 2).copy()

    def rewrite(idx):  # a valid index crc, so only the entry itself is wrong
        raw = idx.astype("<u8").tobytes()
        f.write_bytes(blob[:-(4 * 16 + 4)] + raw
                      + google_crc32c.value(raw).to_bytes(4, "little"))

    rewrite(np.where(np.arange(4)[:, None] == 2, np.uint64(2**64 - 1), index))
    np.testing.assert_array_equal(reader.read(np.array([0, 1, 3])), data[[0, 1, 3]])
    msg = damage_and_read(arr, reader, np.array([2]))
    assert "NOT_FOUND" in msg and "row 2 is missing" in msg and "shard 0, rows [0, 4)" in msg
    index[3, 1] += 8  # wrong size
    rewrite(index)
    msg = damage_and_read(arr, reader, np.array([3]))
    assert "DATA_LOSS" in msg and "bad index entry" in msg and "row 3" in msg


def test_cached_shard_index_is_reread_when_the_file_changes(tmp_path, rng, backend):
    arr, data, reader = make(tmp_path / "ids", rng)
    np.testing.assert_array_equal(reader.read(np.array([1, 5])), data[[1, 5]])  # cached
    new = (data[4:8] ^ 0x5A5A).astype(data.dtype)
    create_array(tmp_path / "ids", shape=data.shape, dtype=data.dtype,
                 shard_rows=4)[4:8].write(new).result()  # shard 1 rewritten (new file)
    np.testing.assert_array_equal(reader.read(np.array([5, 1])), np.stack([new[1], data[1]]))
    f = tmp_path / "ids" / "c" / "1" / "0" / "0"
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, same mtime: only ctime tells
        fh.seek(st.st_size - 12)
        byte = fh.read(1)
        fh.seek(st.st_size - 12)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    msg = damage_and_read(arr, reader, np.array([6]))
    assert "DATA_LOSS" in msg and "index" in msg and "shard 1, rows [4, 8)" in msg


def test_runs_of_abutting_rows_are_checked_row_by_row(tmp_path, rng, backend):
    arr, data, reader = make(tmp_path / "ids", rng, rows=13, shard_rows=8)
    rows = np.array([12, 3, 4, 5, 5, 6, 7, 0, 1, 2, 8, 9, 6])  # runs, repeats, 2 shards
    np.testing.assert_array_equal(reader.read(rows), data[rows])
    np.testing.assert_array_equal(reader.read(np.arange(13)), data)
    f = tmp_path / "ids" / "c" / "0" / "0" / "0"
    blob = bytearray(f.read_bytes())
    blob[5 * (5 * 3 * 2 + 4) + 11] ^= 0x10  # inside row 5, mid-run in a sequential read
    f.write_bytes(bytes(blob))
    np.testing.assert_array_equal(reader.read(np.array([4, 6, 7, 3])), data[[4, 6, 7, 3]])
    msg = damage_and_read(arr, reader, np.arange(13))
    assert "DATA_LOSS" in msg and "row 5 " in msg and "shard 0, rows [0, 8)" in msg


def test_open_shard_files_are_bounded_revalidated_and_closed(tmp_path, rng, backend,
                                                             monkeypatch):
    monkeypatch.setattr(shardread, "_MAX_FDS", 2)
    arr, data, reader = make(tmp_path / "ids", rng)
    for rows in ([0, 4, 8], [9, 1], [5, 10]):
        np.testing.assert_array_equal(reader.read(np.array(rows)), data[rows])
        assert len(reader._fds) <= 2
    assert set(reader._fds) == {1, 2}
    os.remove(tmp_path / "ids" / "c" / "1" / "0" / "0")  # while its descriptor is cached
    msg = damage_and_read(arr, reader, np.array([6]))
    assert "NOT_FOUND" in msg and "c/1/0/0" in msg and "shard 1, rows [4, 8)" in msg
    assert not reader._fds  # a failed read closes every kept file
    np.testing.assert_array_equal(reader.read(np.array([2, 9])), data[[2, 9]])
    fds = [entry[1] for entry in reader._fds.values()]
    assert len(fds) == 2
    reader.close()
    assert not reader._fds
    for fd in fds:  # closed: the number is free or now names some other file
        with contextlib.suppress(OSError):
            assert not os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
    np.testing.assert_array_equal(reader.read(np.array([10, 2])), data[[10, 2]])


def test_zero_copy_crc_equals_google_crc32c_of_bytes(rng):
    import google_crc32c

    if shardread._crc_any is None:
        pytest.skip("this google-crc32c/NumPy pair cannot check arrays in place")
    rows = rng.integers(0, 256, (3, 1001), dtype=np.uint8)
    for row in rows:
        assert shardread._crc_any(row) == google_crc32c.value(row.tobytes())
