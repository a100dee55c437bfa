"""The abstract inputs `kdjax compile` lowers on are what `kdjax train` builds."""

import jax
import numpy as np

from kdjax.compile import abstract as ab
from kdjax.compile import steps
from kdjax.compile.plan import make_plan, precompute_config
from kdjax.train.config import config_from_dict
from kdjax.train.loop import build_student
from kdjax.train.state import create_train_state


def _config(tmp_path, **extra):
    return config_from_dict({
        "run_dir": str(tmp_path), "steps": 4, "global_batch_size": 8,
        "model": {"init": dict(vocab_size=300, hidden_size=32, intermediate_size=48,
                               num_layers=2, num_heads=4, num_kv_heads=2)},
        "data": {"train": str(tmp_path / "tokens"), "seq_len": 16},
        "store": {"path": str(tmp_path / "store"), "mode": "sampled"},
        "mesh": {"data": 2, "fsdp": -1}, **extra})


def _signature(tree):
    return jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype), x.sharding.spec), tree)


def test_abstract_state_matches_the_real_one(tmp_path):
    config = _config(tmp_path)
    plan = make_plan(config, jax.devices()[:8])
    lowered = steps.train_step(plan)
    abstract_state = lowered.args[0]
    tx = config.optimizer.build(config.steps)
    real = create_train_state(build_student(config, plan.mesh), tx, mesh=plan.mesh, seed=0)
    assert _signature(abstract_state.params) == _signature(real.params)
    assert _signature(abstract_state.opt_state) == _signature(real.opt_state)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(real)


def test_synthetic_store_batch_has_the_store_dtypes(tmp_path):
    config = _config(tmp_path)
    pc = precompute_config(config, ["num_samples=300", "num_slots=8"])
    manifest = ab.synthetic_manifest("sampled", seq_len=16, vocab_size=300, precompute=pc)
    mesh = make_plan(config, jax.devices()[:8]).mesh
    batch = ab.teacher_batch(manifest, 8, mesh)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {
        "teacher_ids": ((8, 16, 8), np.dtype("uint16")),
        "teacher_counts": ((8, 16, 8), np.dtype("uint16"))}  # N=300 needs 16 bits
    assert pc.mode == "sampled" and pc.batch_size == 8
