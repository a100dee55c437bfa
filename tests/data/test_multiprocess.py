"""Several local JAX processes (jax.distributed on localhost, gloo): 2 processes × 2 CPU
devices assemble exactly the global batches of 1 process × 4 devices, each reading only its
own rows; 2 processes packing one output directory write it once."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax.data import Loader
from kdjax.sharding import make_mesh


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_with_four_devices(store, teacher, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "_mp_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, worker, str(port), str(i), "2", str(store.path), str(teacher.path),
         str(tmp_path / f"p{i}.npz")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    # each process read only the half of the batch its two devices hold
    np.testing.assert_array_equal(got[0]["local_positions"], np.arange(4))
    np.testing.assert_array_equal(got[1]["local_positions"], np.arange(4, 8))

    ref = Loader(store, global_batch_size=8, seed=11, mesh=make_mesh(devices=jax.devices()[:4]),
                 teacher_store=teacher)
    for step in (2, 3, 4):
        expect = {k: np.asarray(v) for k, v in ref.batch_at(step).items()}
        assert len(expect) == 7
        for k, v in expect.items():
            for g in got:  # both processes assembled the same global batch
                np.testing.assert_array_equal(g[f"{step}/{k}"], v)


@pytest.mark.multiprocess
def test_two_processes_pack_once_and_return_the_same_summary(text_corpus, tokenizer_dir,
                                                             token_stores, tmp_path):
    """`build_token_store` (`kdjax pack`) run by 2 processes on one output directory:
    process 0 alone writes, both return its summary, and the stores equal a 1-process
    pack. An error on the primary reaches both; so do results, also through the
    device-collective fallback of kdjax.distributed."""
    from kdjax.data import open_token_store

    worker = os.path.join(os.path.dirname(__file__), "_mp_pack_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    port, out = free_port(), tmp_path / "stores"
    procs = [subprocess.Popen(
        [sys.executable, worker, str(port), str(i), "2", str(text_corpus), str(tokenizer_dir),
         str(out), str(tmp_path / f"p{i}.json")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert got[0]["writes"] == ["train", "eval"] and got[1]["writes"] == []
    assert got[0]["summary"] == got[1]["summary"]
    want = token_stores[1]  # the same corpus and settings packed by one process
    for split in ("train", "eval"):
        s = got[0]["summary"][split]
        assert s["path"] == str(out / split)
        assert (s["rows"], s["fingerprint"]) == (want[split]["rows"],
                                                 want[split]["fingerprint"])
        store = open_token_store(out, split)
        assert store.fingerprint == s["fingerprint"] and store.num_rows == s["rows"]
        np.testing.assert_array_equal(store.read(np.arange(store.num_rows))["tokens"],
                                      open_token_store(token_stores[0], split).read(
                                          np.arange(store.num_rows))["tokens"])
    for tag in ("service", "collectives"):
        assert got[0][f"{tag}/error"] == "ValueError: bad value 7; pass 8"
        assert got[1][f"{tag}/error"] == ("PrimaryFailedError: the primary process (0) "
                                          "failed while writing boom: ValueError: bad value "
                                          "7; pass 8 (its log has the traceback)")
        assert got[0][f"{tag}/result"] == got[1][f"{tag}/result"] == {"rank": 0}
