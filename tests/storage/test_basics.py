"""Fingerprints, id dtypes, atomic manifests, the ledger and the writer lock."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdjax.storage import (
    ShardLedger,
    StoreIncompleteError,
    StoreLockedError,
    WriterLock,
    cast_checked,
    fingerprint_bytes,
    fingerprint_dir,
    fingerprint_file,
    fingerprint_json,
    id_dtype,
    read_json,
    read_manifest,
    smallest_uint,
    write_json_atomic,
    write_manifest,
)


def test_fingerprint_json_is_canonical():
    a = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    b = {"a": {"y": True, "z": None}, "b": [1, 2.5, "x"]}
    assert fingerprint_json(a) == fingerprint_json(b)
    assert fingerprint_json(a) != fingerprint_json({**a, "b": [1, 2.5, "y"]})
    assert fingerprint_json({"n": np.int64(3)}) == fingerprint_json({"n": 3})
    assert len(fingerprint_json(a)) == 64
    with pytest.raises(ValueError):
        fingerprint_json({"x": float("nan")})
    with pytest.raises(TypeError, match="object"):
        fingerprint_json({"x": object()})


def test_fingerprint_bytes_includes_dtype_and_shape(rng):
    x = rng.integers(0, 100, size=(4, 6)).astype(np.int32)
    assert fingerprint_bytes(x) == fingerprint_bytes(x.copy())
    assert fingerprint_bytes(x) != fingerprint_bytes(x.reshape(6, 4))
    assert fingerprint_bytes(x) != fingerprint_bytes(x.view(np.float32))


def test_fingerprint_files_and_dirs_ignore_location(tmp_path):
    for root in ("a", "b"):
        (tmp_path / root / "sub").mkdir(parents=True)
        (tmp_path / root / "tok.json").write_text('{"v": 1}')
        (tmp_path / root / "sub" / "x.txt").write_text("hello")
    (tmp_path / "b" / ".hidden").write_text("ignored")
    assert fingerprint_dir(tmp_path / "a") == fingerprint_dir(tmp_path / "b")
    assert fingerprint_file(tmp_path / "a" / "tok.json") == fingerprint_file(
        tmp_path / "b" / "tok.json")
    (tmp_path / "b" / "sub" / "x.txt").write_text("hellp")
    assert fingerprint_dir(tmp_path / "a") != fingerprint_dir(tmp_path / "b")
    assert fingerprint_dir(tmp_path / "a", patterns=["*.json"]) == fingerprint_dir(
        tmp_path / "b", patterns=["*.json"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fingerprint_dir(tmp_path / "nope")


@pytest.mark.parametrize("vocab,dtype", [(2, np.uint8), (255, np.uint8), (256, np.uint16),
                                         (32000, np.uint16), (65535, np.uint16),
                                         (65536, np.uint32), (151936, np.uint32)])
def test_id_dtype_is_smallest_that_holds_every_id(vocab, dtype):
    dt = id_dtype(vocab)
    assert dt == np.dtype(dtype)
    assert np.iinfo(dt).max >= vocab - 1  # every id fits
    smaller = [d for d in (np.uint8, np.uint16) if np.dtype(d).itemsize < dt.itemsize]
    for d in smaller:  # and no smaller dtype keeps its max free as a sentinel
        assert np.iinfo(d).max < vocab


def test_smallest_uint_and_checked_cast():
    assert smallest_uint(0) == np.uint8 and smallest_uint(256) == np.uint16
    with pytest.raises(ValueError, match="max_value"):
        smallest_uint(-1)
    with pytest.raises(ValueError, match="vocab_size"):
        id_dtype(0)
    ok = cast_checked(np.array([0, 65535]), np.uint16, name="ids")
    assert ok.dtype == np.uint16 and ok.tolist() == [0, 65535]
    with pytest.raises(ValueError, match=r"ids has values in \[0, 65536\].*uint16"):
        cast_checked(np.array([0, 65536]), np.uint16, name="ids")
    with pytest.raises(ValueError, match="counts"):
        cast_checked(np.array([-1, 3]), np.uint8, name="counts")


def test_atomic_json_roundtrip_and_no_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1, "v": np.float32(0.5)})
    assert read_json(path) == {"a": 1, "v": 0.5}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert read_json(path) == {"a": 1, "v": 0.5}  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no tmp left behind


def test_read_manifest_refuses_missing_and_incomplete(tmp_path):
    with pytest.raises(StoreIncompleteError, match="does not exist"):
        read_manifest(tmp_path / "none")
    with pytest.raises(StoreIncompleteError, match="no manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="complete"):
        write_manifest(tmp_path, {"rows": 3})
    write_manifest(tmp_path, {"rows": 3, "complete": False})
    with pytest.raises(StoreIncompleteError, match="incomplete.*re-run"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, require_complete=False)["rows"] == 3
    write_manifest(tmp_path, {"rows": 3, "complete": True})
    assert read_manifest(tmp_path) == {"rows": 3, "complete": True}
    (tmp_path / "manifest.json").write_text('{"rows": 3, "compl')  # torn by hand
    with pytest.raises(Exception, match="not valid JSON"):
        read_manifest(tmp_path)


def test_ledger_records_and_reports_missing(tmp_path):
    ledger = ShardLedger(tmp_path, 5)
    assert ledger.missing() == [0, 1, 2, 3, 4] and not ledger.is_complete()
    ledger.record(3, {"rows": 7})
    ledger.record(0)
    assert ShardLedger(tmp_path, 5).missing() == [1, 2, 4]  # persisted
    assert ledger.info(3) == {"shard": 3, "rows": 7}
    with pytest.raises(ValueError, match="out of range"):
        ledger.record(5)
    for s in (1, 2, 4):
        ledger.record(s)
    assert ledger.is_complete() and ledger.done() == {0, 1, 2, 3, 4}
    ledger.clear()
    assert ledger.missing() == [0, 1, 2, 3, 4]


def test_second_writer_is_refused(tmp_path):
    with WriterLock(tmp_path):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}.*two writers"):
            WriterLock(tmp_path).acquire()
        WriterLock(tmp_path, name="writer-1").acquire().release()  # other process index
    with WriterLock(tmp_path) as lock:  # released on exit
        assert lock.held


def test_lock_of_killed_writer_is_not_stale(tmp_path):
    code = ("import sys, time; from kdjax.storage import WriterLock; "
            f"WriterLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            WriterLock(tmp_path).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 5
    while True:  # the kernel drops the dead holder's flock
        try:
            WriterLock(tmp_path).acquire().release()
            break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
