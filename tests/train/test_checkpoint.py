"""Checkpoints: exact round trip, keep-last-N, resharding on restore, refused resumes,
and a save killed with SIGKILL before it committed is never taken as a checkpoint."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.sharding import make_mesh
from kdjax.train.checkpoint import (
    Checkpointer,
    ResumeError,
    abstract_like,
    config_differences,
    read_run_config,
)
from kdjax.train.config import load_config

BASE = ["steps=10", "global_batch_size=8", "model.init={vocab_size: 64, hidden_size: 16, "
        "intermediate_size: 32, num_layers: 1, num_heads: 2}", "data.train=/tmp/tok",
        "objective.alpha=1", "checkpoint.keep=2"]


def _config(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", *BASE, *extra])


def _state(rng, mesh):
    """A train-state-like pytree: sharded params, AdamW state, step, typed RNG key."""
    params = {"embed": rng.standard_normal((16, 8)).astype(np.float32),
              "layer": {"w": rng.standard_normal((8, 8)).astype(np.float32),
                        "norm": rng.standard_normal((8,)).astype(np.float32)}}
    specs = {"embed": P("data", "tensor"), "layer": {"w": P(None, "tensor"), "norm": P()}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                          specs)
    tx = optax.adamw(1e-2)

    @jax.jit  # one compile instead of dozens of eager ops
    def one_step(params):
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda x: x * 0.5 + 1.0, params)
        updates, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = one_step(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32),
            "rng": jax.random.key(3)}


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=1, tensor=4)


def test_round_trip_is_exact_and_keeps_last_n(tmp_path, rng, mesh):
    config = _config(tmp_path / "run")
    state = _state(rng, mesh)
    with Checkpointer(config, {"token_store": "abc"}) as ckpt:
        assert ckpt.latest_step() is None
        for step in (1, 2, 3):
            copy = jax.tree.map(jnp.copy, state)
            ckpt.save(step, copy)
            # the train step donates its state right after an async save returns: the
            # save must already hold what it needs
            jax.tree.map(lambda x: x.delete(), copy)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "3"]
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    items = {p.name for p in step_dir.iterdir() if p.is_dir()}
    assert items == {"config", "meta", "state"}  # and nothing else (never a teacher)
    with Checkpointer(config, {"token_store": "abc"}) as ckpt:
        restored = ckpt.restore(abstract_like(state))
    _assert_same(restored, state)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert x.sharding == y.sharding
    assert read_run_config(tmp_path / "run") == config


def test_restore_onto_a_different_mesh_layout(tmp_path, rng, mesh):
    config = _config(tmp_path / "run")
    state = _state(rng, mesh)
    with Checkpointer(config) as ckpt:
        ckpt.save(5, state, wait=True)
    other = make_mesh(data=1, fsdp=4, tensor=2)

    def target(x):
        spec = P(*([("fsdp", "tensor")] + [None] * (x.ndim - 1))) if x.ndim else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, spec))

    abstract = jax.tree.map(target, state)
    with Checkpointer(config.replace("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")) as ckpt:
        restored = ckpt.restore(abstract, step=5)
    _assert_same(restored, state)
    w = restored["params"]["embed"]
    assert w.sharding.mesh.shape == other.shape and w.sharding.spec == P(("fsdp", "tensor"), None)
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 8)


def test_incompatible_resume_is_refused(tmp_path, rng, mesh):
    config = _config(tmp_path / "run")
    state = _state(rng, mesh)
    with Checkpointer(config, {"token_store": "abc", "teacher_store": "t1"}) as ckpt:
        ckpt.save(1, state, wait=True)
    abstract = abstract_like(state)
    # longer training, a new mesh and other logging are fine
    fine = config.replace("steps=20", "logging.every=1", "mesh.data=8")
    with Checkpointer(fine, {"token_store": "abc", "teacher_store": "t1"}) as ckpt:
        _assert_same(ckpt.restore(abstract), state)
    with (Checkpointer(config, {"token_store": "abc", "teacher_store": "t2"}) as ckpt,
          pytest.raises(ResumeError, match=r"teacher_store: 't1' → 't2'")):
        ckpt.restore(abstract)
    changed = config.replace("optimizer.lr=1e-2", "model.init.hidden_size=32")
    with (Checkpointer(changed, {"token_store": "abc", "teacher_store": "t1"}) as ckpt,
          pytest.raises(ResumeError) as info):
        ckpt.restore(abstract)
    message = str(info.value)
    assert "optimizer.lr: 0.0003 → 0.01" in message and "model.init.hidden_size: 16 → 32" in (
        message) and "new run_dir" in message


def test_config_differences_allows_only_resumable_keys():
    saved = {"steps": 3, "mesh": {"data": 2}, "seed": 0, "objective": {"alpha": 0.5}}
    current = {"steps": 9, "mesh": {"data": 4}, "seed": 1, "objective": {"alpha": 0.5}}
    assert config_differences(saved, current) == ["seed: 0 → 1"]
    # schema evolution: a field kdjax dropped is ignored, one it added counts at its default
    assert config_differences(
        {"store": {"path": None, "old_flag": True}, "objective": {"alpha": 0.5}},
        {"store": {"path": None}, "objective": {"alpha": 0.5, "t2_scaling": True}}) == []
    assert config_differences({"objective": {"alpha": 0.5}},
                              {"objective": {"alpha": 0.5, "t2_scaling": False}}) == [
        "objective.t2_scaling: '<unset>' → False"]
    assert config_differences({"objective": {"divergence_kwargs": {"beta": 0.5}}},
                              {"objective": {"divergence_kwargs": {}}}) != []


KILLED_SAVE = textwrap.dedent("""
    import asyncio, os, sys, pathlib
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from kdjax.train.checkpoint import Checkpointer
    from kdjax.train.config import load_config

    run_dir, marker, *overrides = sys.argv[1:]
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def hang_on_step_2(self):
        if self.get_final().name == "2":  # every item written, commit not yet renamed
            pathlib.Path(marker).write_text("ready")
            await asyncio.sleep(3600)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = hang_on_step_2
    ckpt = Checkpointer(load_config(None, [f"run_dir={run_dir}", *overrides]))
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "step": jnp.asarray(1)}
    ckpt.save(1, state, wait=True)
    ckpt.save(2, {"w": state["w"] * 2, "step": jnp.asarray(2)})
    ckpt.wait()
""")


def test_save_killed_before_commit_is_not_a_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(run_dir), str(marker),
                             *BASE], env=env, cwd=pathlib.Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the saving process ended early"
            assert time.monotonic() < deadline, "the save of step 2 never reached commit"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = sorted(os.listdir(run_dir / "checkpoints"))
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in leftovers), leftovers
    config = _config(run_dir)
    with Checkpointer(config) as ckpt:
        assert ckpt.all_steps() == [1]
        abstract = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
        restored = ckpt.restore(abstract)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096))
        assert int(restored["step"]) == 1
        ckpt.save(2, {"w": restored["w"] * 2, "step": jnp.asarray(2)}, wait=True)
        assert ckpt.all_steps() == [1, 2]
    assert not any("tmp" in name for name in os.listdir(run_dir / "checkpoints"))
