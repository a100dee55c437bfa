"""Loop pieces that need no data: optimizer mapping, the non-finite stop, student build.

The loop itself (train → checkpoint → resume, kill -9, 2 processes, online teacher) is
exercised end to end in test_e2e.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.train.config import config_from_dict
from kdjax.train.loop import NonFiniteError, _check_finite, build_student


def _config(tmp_path, **optimizer):
    return config_from_dict({
        "run_dir": str(tmp_path), "steps": 20, "global_batch_size": 8,
        "model": {"init": dict(vocab_size=40, hidden_size=16, intermediate_size=32,
                               num_layers=1, num_heads=2), "dtype": "bfloat16"},
        "data": {"train": "unused"}, "objective": {"alpha": 1.0},
        "optimizer": {"lr": 0.5, "warmup_steps": 5, "min_lr_ratio": 0.2, **optimizer}})


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_optimizer_follows_the_config(tmp_path, decay):
    config = _config(tmp_path, decay=decay, clip_norm=None)
    assert config.optimizer.clip_norm is None
    schedule = config.optimizer.schedule(config.steps)
    lr = [float(schedule(jnp.int32(s))) for s in (0, 5, 20)]
    end = {"cosine": 0.1, "linear": 0.1, "constant": 0.5}[decay]
    np.testing.assert_allclose(lr, [0.0, 0.5, end], rtol=1e-6)


def test_nonfinite_streak_stops_only_at_the_limit():
    _check_finite({"nonfinite": np.int32(2)}, limit=3, step=7)
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite updates .* step 9"):
        _check_finite({"nonfinite": np.int32(3)}, limit=3, step=9)


def test_student_from_init_uses_the_configured_dtypes(tmp_path):
    model = build_student(_config(tmp_path), mesh=None)
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
    assert model.embed[...].dtype == jnp.float32  # f32 master weights
    out = model(jnp.ones((1, 4), jnp.int32))
    assert out.logits.dtype == jnp.bfloat16  # bf16 compute


def test_random_student_is_created_sharded(tmp_path):
    import jax

    from kdjax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=8, devices=jax.devices()[:8])
    model = build_student(_config(tmp_path), mesh=mesh)
    sharding = model.embed[...].sharding
    assert sharding.mesh.shape == mesh.shape and "fsdp" in str(sharding.spec)
    assert model.embed[...].addressable_shards[0].data.shape == (40, 2)  # embed 16 / 8
