"""Crash safety and multi-process writing: kill -9 + rerun, and 2 processes on localhost,
both end byte-identical to one uninterrupted single-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdjax.storage import StoreIncompleteError
from kdjax.teacher import PrecomputeConfig, open_teacher_store, precompute
from tests.teacher import helpers

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _config(tokens, out) -> PrecomputeConfig:
    return PrecomputeConfig(tokens=tokens, out=str(out), mode="sampled", num_samples=16,
                            num_slots=6, seed=5, batch_size=8, shard_rows=8,
                            hidden_layers=(1,), teacher_fingerprint="tiny-teacher-seed-0",
                            progress=False)


def _spawn(config: PrecomputeConfig, tmp: Path, devices: int, *extra):
    """Starts the driver; returns (process, its log file)."""
    n = len(list(tmp.glob("config-*")))
    cfg_file, log = tmp / f"config-{n}.json", tmp / f"log-{n}.txt"
    cfg_file.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.teacher.driver", str(cfg_file),
                                 *extra], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run (8 devices) over 5 shards (the last partial)."""
    root = tmp_path_factory.mktemp("resume")
    tokens = helpers.write_token_store(root / "tokens", num_rows=36, shard_rows=8)
    precompute(_config(tokens, root / "reference"), model=helpers.tiny_decoder())
    return root, tokens, helpers.store_files(root / "reference")


def test_kill_9_then_rerun_is_identical(reference, tmp_path):
    root, tokens, want = reference
    config = _config(tokens, tmp_path / "store")
    proc, log = _spawn(config, tmp_path, 8, "--delay", "0.5")
    ledger = tmp_path / "store" / "ledger"
    deadline = time.monotonic() + 240
    while not (ledger.is_dir() and any(ledger.glob("shard-*.json"))):
        assert proc.poll() is None, f"precompute exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no shard committed within 240 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(ledger.glob("shard-*.json")))
    assert 1 <= done < 5
    with pytest.raises(StoreIncompleteError):
        open_teacher_store(config.out)
    summary = precompute(config, model=helpers.tiny_decoder())
    assert summary["shards"] == 5 - done  # only the missing shards were redone
    assert helpers.differing_files(helpers.store_files(config.out), want) == []


@pytest.mark.multiprocess
def test_two_processes_write_the_same_store_as_one(reference, tmp_path):
    root, tokens, want = reference
    config = _config(tokens, tmp_path / "store")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_spawn(config, tmp_path, 4, "--coordinator", f"localhost:{port}",
                    "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
    for p, log in procs:
        assert p.wait(timeout=300) == 0, log.read_text()
    assert helpers.differing_files(helpers.store_files(config.out), want) == []
