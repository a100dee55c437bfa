"""Row-sharded crc32c arrays and the resumable row store: missing chunks, corruption,
kill -9 and resume, plan mismatches."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kdjax.storage import (
    RowStoreWriter,
    StoreCorruptError,
    StoreIncompleteError,
    StoreLockedError,
    StoreMismatchError,
    create_array,
    open_array,
    open_row_store,
    read_rows,
)

ARRAYS = {"ids": ((6, 3), np.uint16), "counts": ((6, 3), np.uint8)}
ROWS, SHARD = 10, 4


def shard_data(shard):
    """Deterministic content of `shard` (rows [4s, min(4s+4, 10)))."""
    lo, hi = shard * SHARD, min(shard * SHARD + SHARD, ROWS)
    r = np.random.default_rng(shard)
    return {"ids": r.integers(0, 65535, size=(hi - lo, 6, 3)),
            "counts": r.integers(0, 255, size=(hi - lo, 6, 3))}


def write_store(path, shards=None, **kw):
    with RowStoreWriter(path, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                        metadata={"mode": "sampled"}, **kw) as w:
        for s in w.missing_shards() if shards is None else shards:
            w.write_shard(s, shard_data(s))
        if shards is None:
            w.finalize({"stat": 1.5})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("rowstore") / "s")


def expected():
    parts = [shard_data(s) for s in range(3)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ARRAYS}


def test_roundtrip_in_any_order_with_repeats(store, rng):
    s = open_row_store(store)
    assert s.num_rows == ROWS and s.manifest["complete"] and s.manifest["stat"] == 1.5
    rows = rng.integers(0, ROWS, size=13)
    got = s.read(rows)
    for k in ARRAYS:
        np.testing.assert_array_equal(got[k], expected()[k][rows])
        assert got[k].dtype == ARRAYS[k][1]
    assert s.check() == []
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        s.read(np.array([3, 10]))
    with pytest.raises(TypeError, match="1-D integer"):
        s.read(np.array([[1]]))


def test_zero_chunks_are_stored_and_missing_chunks_raise(tmp_path):
    arr = create_array(tmp_path / "z", shape=(8, 5), dtype=np.uint16, shard_rows=4)
    arr.write(np.zeros((8, 5), np.uint16)).result()  # all fill value: still stored
    assert sorted(os.listdir(tmp_path / "z" / "c")) == ["0", "1"]
    ro = open_array(tmp_path / "z")
    assert (read_rows({"z": ro}, np.array([0, 7]))["z"] == 0).all()
    os.remove(tmp_path / "z" / "c" / "1" / "0")
    with pytest.raises(StoreCorruptError, match=r"NOT_FOUND.*'z'.*shard 1, rows \[4, 8\)"):
        read_rows({"z": ro}, np.array([5]))
    with pytest.raises(StoreMismatchError, match="different layout"):
        create_array(tmp_path / "z", shape=(8, 5), dtype=np.uint32, shard_rows=4)


def test_missing_shard_file_in_store_is_an_error_not_zeros(tmp_path):
    path = write_store(tmp_path / "s")
    os.remove(path / "arrays" / "counts" / "c" / "2" / "0" / "0")
    s = open_row_store(path)
    np.testing.assert_array_equal(s.read(np.array([1]))["counts"], expected()["counts"][[1]])
    with pytest.raises(StoreCorruptError, match=r"'counts'.*shard 2, rows \[8, 10\)"):
        s.read(np.array([1, 9]))
    problems = s.check()
    assert len(problems) == 1 and "shard 2" in problems[0]


def test_flipped_byte_is_data_loss_naming_array_and_chunk(tmp_path):
    path = write_store(tmp_path / "s")
    f = path / "arrays" / "ids" / "c" / "1" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[40] ^= 0x10  # inside the second inner chunk (row 5); each is 6*3*2 + 4 bytes
    f.write_bytes(bytes(data))
    s = open_row_store(path)
    np.testing.assert_array_equal(s.read(np.array([4, 6]))["ids"], expected()["ids"][[4, 6]])
    with pytest.raises(StoreCorruptError,
                       match=r"DATA_LOSS.*'ids'.*c/1/0/0.*shard 1, rows \[4, 8\).*[Dd]igest"):
        s.read(np.array([5]))
    problems = s.check()
    assert len(problems) == 1 and "DATA_LOSS" in problems[0] and "'ids'" in problems[0]
    f.write_bytes(bytes(data[:30]))  # truncated shard
    with pytest.raises(StoreCorruptError, match=r"'ids'.*shard 1"):
        s.read(np.array([4]))


def test_interrupted_store_is_refused_then_resumed(tmp_path):
    path = write_store(tmp_path / "s", shards=[2, 0])  # writer stopped before shard 1
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        open_row_store(path)
    with RowStoreWriter(path, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                        metadata={"mode": "sampled"}) as w:
        assert w.missing_shards() == [1]
        with pytest.raises(StoreIncompleteError, match="1 of 3 shards"):
            w.finalize()
    write_store(path)
    got = open_row_store(path).read(np.arange(ROWS))
    for k in ARRAYS:
        np.testing.assert_array_equal(got[k], expected()[k])


def test_plan_mismatch_refused_unless_overwrite(tmp_path):
    path = write_store(tmp_path / "s", shards=[0])
    with pytest.raises(StoreMismatchError, match="differs in: mode"):
        RowStoreWriter(path, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                       metadata={"mode": "topk"})
    with RowStoreWriter(path, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                        metadata={"mode": "topk"}, overwrite=True) as w:
        assert w.missing_shards() == [0, 1, 2]


def test_write_shard_validates(tmp_path):
    with RowStoreWriter(tmp_path / "s", arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD) as w:
        with pytest.raises(StoreLockedError):
            RowStoreWriter(tmp_path / "s", arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD)
        bad = shard_data(0)
        with pytest.raises(ValueError, match=r"'ids' for shard 2.*\(2, 6, 3\)"):
            w.write_shard(2, bad)
        with pytest.raises(ValueError, match="exactly the arrays"):
            w.write_shard(0, {"ids": bad["ids"]})
        with pytest.raises(ValueError, match="counts has values in"):
            w.write_shard(0, {**bad, "counts": bad["counts"] + 300})
        assert w.missing_shards() == [0, 1, 2]


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {here!r})
    from test_rowstore import ARRAYS, ROWS, SHARD, shard_data
    from kdjax.storage import RowStoreWriter
    w = RowStoreWriter({path!r}, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                       metadata={{"mode": "sampled"}})
    w.write_shard(0, shard_data(0))
    print("wrote", flush=True)
    time.sleep(60)
""")


def test_kill_9_mid_write_then_rerun_equals_uninterrupted(tmp_path):
    path = tmp_path / "s"
    code = _KILLED_WRITER.format(here=os.path.dirname(__file__), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "wrote"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with pytest.raises(StoreIncompleteError):
        open_row_store(path)  # never reads as valid
    with RowStoreWriter(path, arrays=ARRAYS, num_rows=ROWS, shard_rows=SHARD,
                        metadata={"mode": "sampled"}) as w:  # lock is free again
        assert w.missing_shards() == [1, 2]
    write_store(path)
    ref = write_store(tmp_path / "ref")
    a, b = open_row_store(path), open_row_store(ref)
    assert a.manifest == b.manifest
    for k in ARRAYS:
        np.testing.assert_array_equal(a.read(np.arange(ROWS))[k], b.read(np.arange(ROWS))[k])


def test_record_layout_reads_like_arrays_layout(tmp_path, rng):
    arrays = {**ARRAYS, "h": ((3,), "bfloat16"), "m": ((5,), bool)}
    data = {s: {**shard_data(s), "h": rng.normal(size=(min(SHARD, ROWS - SHARD * s), 3)),
                "m": rng.random((min(SHARD, ROWS - SHARD * s), 5)) < 0.5} for s in range(3)}
    stores = {}
    for layout in ("arrays", "record"):
        with RowStoreWriter(tmp_path / layout, arrays=arrays, num_rows=ROWS, shard_rows=SHARD,
                            layout=layout) as w:
            for s in w.missing_shards():
                w.write_shard(s, data[s])
            w.finalize()
        stores[layout] = open_row_store(tmp_path / layout)
    assert sorted(os.listdir(tmp_path / "record" / "arrays")) == ["records"]
    rows = rng.integers(0, ROWS, size=9)
    a, r = stores["arrays"].read(rows), stores["record"].read(rows)
    assert sorted(r) == sorted(arrays) == stores["record"].names
    for k in arrays:
        assert r[k].dtype == a[k].dtype and r[k].shape == a[k].shape
        np.testing.assert_array_equal(r[k], a[k])
    only = stores["record"].read(rows, ["m"])
    assert list(only) == ["m"]
    with pytest.raises(KeyError, match="no array"):
        stores["record"].read(rows, ["nope"])
    f = tmp_path / "record" / "arrays" / "records" / "c" / "2" / "0"
    blob = bytearray(f.read_bytes())
    blob[7] ^= 1
    f.write_bytes(bytes(blob))
    with pytest.raises(StoreCorruptError,
                       match=r"DATA_LOSS.*'records \(holding.*shard 2, rows \[8, 10\)"):
        stores["record"].read(np.array([8]))
