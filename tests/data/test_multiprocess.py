"""2 processes × 2 CPU devices (jax.distributed on localhost, gloo) assemble exactly the
global batches of 1 process × 4 devices, each process reading only its own rows."""

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
