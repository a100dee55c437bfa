"""The fast shard writer (kdjax.storage.shardwrite): byte-identical shard files to
tensorstore's, readable by tensorstore and the fast reader, atomic (a failed or killed
write leaves the previous file or none), and refusing malformed input."""

import os

import ml_dtypes
import numpy as np
import pytest

from kdjax.storage import (
    RowStoreWriter,
    StoreIncompleteError,
    create_array,
    open_array,
    open_row_store,
    shardread,
    shardwrite,
)

pytestmark = pytest.mark.skipif(shardread._crc_any is None,
                                reason="no zero-copy crc32c: every write goes to tensorstore")


@pytest.fixture(autouse=True)
def fast_paths_on(monkeypatch):
    monkeypatch.delenv("KDJAX_FAST_WRITE", raising=False)
    monkeypatch.delenv("KDJAX_FAST_READ", raising=False)


def random_rows(rng, shape, dtype):
    if dtype is bool:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def shard_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and "/c/" in str(p))


@pytest.mark.parametrize("dtype,row_shape", [(np.uint16, (5, 3)), (bool, (4, 2, 3)),
                                             (ml_dtypes.bfloat16, (3, 7)), (np.float32, (6,))])
def test_shards_are_byte_identical_to_tensorstore(tmp_path, rng, dtype, row_shape):
    rows, shard_rows = 11, 4  # the last shard is partial: its index marks 1 chunk missing
    data = random_rows(rng, (rows, *row_shape), dtype)
    ref = create_array(tmp_path / "ref", shape=data.shape, dtype=dtype, shard_rows=shard_rows)
    ref.write(data).result()
    fast = create_array(tmp_path / "fast", shape=data.shape, dtype=dtype,
                        shard_rows=shard_rows)
    writer = shardwrite.ShardWriter.of(fast)
    assert writer is not None
    for shard in range(3):
        lo, hi = shard * shard_rows, min(rows, (shard + 1) * shard_rows)
        cut = int(rng.integers(lo, hi + 1))  # the rows arrive in two parts (steps)
        writer.write(shard, [data[lo:cut], data[cut:hi]])
    assert shard_files(tmp_path / "fast") == shard_files(tmp_path / "ref")
    for f in shard_files(tmp_path / "ref"):
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    back = open_array(tmp_path / "fast")
    np.testing.assert_array_equal(back.read().result(), data)  # tensorstore decodes it
    np.testing.assert_array_equal(shardread.ShardRowReader.of(back).read(np.arange(rows)),
                                  data)
    assert not [p for p in (tmp_path / "fast").rglob("*") if shardwrite._TMP in p.name]


def test_row_store_writes_parts_fast_and_equal_to_the_slow_path(tmp_path, rng, monkeypatch):
    arrays = {"ids": ((6, 2), np.uint32), "logits": ((6, 5), ml_dtypes.bfloat16),
              "mask": ((6,), bool)}
    data = {k: random_rows(rng, (10, *s), d) for k, (s, d) in arrays.items()}
    for fast in (True, False):
        monkeypatch.setenv("KDJAX_FAST_WRITE", "1" if fast else "0")
        with RowStoreWriter(tmp_path / str(fast), arrays=arrays, num_rows=10, shard_rows=4,
                            metadata={"m": 1}) as w:
            assert all((x is not None) == fast for x in w._writers.values())
            for s in w.missing_shards():
                lo, hi = w.shard_range(s)
                w.write_shard(s, {k: [v[lo:lo + 1], v[lo + 1:hi]] for k, v in data.items()})
            w.finalize()
    for f in shard_files(tmp_path / "False"):
        assert (tmp_path / "True" / f).read_bytes() == (tmp_path / "False" / f).read_bytes()
    store = open_row_store(tmp_path / "True")
    assert store.check() == []
    got = store.read(np.array([9, 0, 4]))
    for k in arrays:
        np.testing.assert_array_equal(got[k], data[k][[9, 0, 4]])


def test_record_layout_with_parts(tmp_path, rng):
    arrays = {"a": ((3,), np.uint16), "b": ((2,), np.int32)}
    data = {k: random_rows(rng, (5, *s), d) for k, (s, d) in arrays.items()}
    with RowStoreWriter(tmp_path / "r", arrays=arrays, num_rows=5, shard_rows=5,
                        layout="record") as w:
        w.write_shard(0, {k: [v[:2], v[2:]] for k, v in data.items()})
        w.finalize()
    got = open_row_store(tmp_path / "r").read(np.arange(5))
    for k in arrays:
        np.testing.assert_array_equal(got[k], data[k])


def test_a_failed_write_keeps_the_old_shard_and_stale_temporaries_go(tmp_path, rng,
                                                                     monkeypatch):
    data = random_rows(rng, (4, 3), np.uint16)
    arr = create_array(tmp_path / "a", shape=(4, 3), dtype=np.uint16, shard_rows=4)
    writer = shardwrite.ShardWriter.of(arr)
    writer.write(0, [data])
    shard = tmp_path / "a" / "c" / "0" / "0"
    before = shard.read_bytes()

    def crash(*_):  # dies between the temporary file and the rename
        raise OSError("simulated crash")

    monkeypatch.setattr(shardwrite.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        writer.write(0, [data[::-1].copy()])
    monkeypatch.undo()
    assert shard.read_bytes() == before
    assert not [p for p in shard.parent.iterdir() if shardwrite._TMP in p.name]
    # what kill -9 leaves: a half-written temporary, which no reader opens
    stale = shard.parent / f".0{shardwrite._TMP}424242"
    stale.write_bytes(before[:7])
    np.testing.assert_array_equal(open_array(tmp_path / "a").read().result(), data)
    writer.write(0, [data[::-1].copy()])
    assert not stale.exists()
    np.testing.assert_array_equal(open_array(tmp_path / "a").read().result(), data[::-1])


def test_a_missing_shard_stays_an_error_after_a_failed_first_write(tmp_path, rng,
                                                                   monkeypatch):
    arr = create_array(tmp_path / "a", shape=(4, 3), dtype=np.uint16, shard_rows=4)
    monkeypatch.setattr(shardwrite, "_writev_all", lambda *a: (_ for _ in ()).throw(
        OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        shardwrite.ShardWriter.of(arr).write(0, [random_rows(rng, (4, 3), np.uint16)])
    reader = shardread.ShardRowReader.of(open_array(tmp_path / "a"))
    with pytest.raises(shardread.ShardReadError, match="NOT_FOUND"):
        reader.read(np.array([0]))


def test_bad_input_is_refused_before_anything_is_written(tmp_path, rng):
    arr = create_array(tmp_path / "a", shape=(6, 3), dtype=np.uint16, shard_rows=4)
    writer = shardwrite.ShardWriter.of(arr)
    with pytest.raises(ValueError, match="shard 1 .* needs 2 rows, got 3"):
        writer.write(1, [random_rows(rng, (3, 3), np.uint16)])
    with pytest.raises(ValueError, match=r"must be uint16 \[n, 3\], got int32"):
        writer.write(0, [np.zeros((4, 3), np.int32)])
    with pytest.raises(ValueError, match="shard 2 .* needs 0 rows"):
        writer.write(2, [])
    assert shard_files(tmp_path / "a") == []
    with RowStoreWriter(tmp_path / "s", arrays={"x": ((3,), np.uint16)}, num_rows=6,
                        shard_rows=4) as w:
        with pytest.raises(ValueError, match=r"'x' for shard 0 .* \(4, 3\), got parts"):
            w.write_shard(0, {"x": [np.zeros((2, 3)), np.zeros((2, 4))]})
        with pytest.raises(ValueError, match="do not fit uint16"):
            w.write_shard(0, {"x": [np.zeros((2, 3)), np.full((2, 3), 70000)]})
        assert w.missing_shards() == [0, 1]
    with pytest.raises(StoreIncompleteError):
        open_row_store(tmp_path / "s")


def test_other_layouts_are_left_to_tensorstore(tmp_path, monkeypatch):
    two = create_array(tmp_path / "two", shape=(8, 3), dtype=np.uint8, shard_rows=4,
                       chunk_rows=2)
    assert shardwrite.ShardWriter.of(two) is None
    one = create_array(tmp_path / "one", shape=(8, 3), dtype=np.uint8, shard_rows=4)
    monkeypatch.setenv("KDJAX_FAST_WRITE", "0")
    assert shardwrite.ShardWriter.of(one) is None
    monkeypatch.setattr(shardread, "_crc_any", None)
    monkeypatch.delenv("KDJAX_FAST_WRITE")
    assert shardwrite.ShardWriter.of(one) is None
    assert os.listdir(tmp_path / "one") == ["zarr.json"]
