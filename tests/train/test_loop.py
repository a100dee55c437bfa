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


def test_student_from_teacher_layers(tmp_path):
    """model.init_from + keep_layers: the student starts from the teacher's chosen layers,
    its config (for export) says so, and bad settings are refused at load time."""
    from flax import nnx

    from kdjax.models import Decoder, DecoderConfig, save_pretrained
    from kdjax.schema import ConfigError
    from kdjax.train.checkpoint import student_decoder_config

    teacher = Decoder(DecoderConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                    num_layers=4, num_heads=2), rngs=nnx.Rngs(3))
    save_pretrained(teacher, tmp_path / "teacher")
    base = _config(tmp_path).to_dict()
    base["model"] = {"init_from": str(tmp_path / "teacher"), "keep_layers": [0, 3],
                     "dtype": "float32"}
    config = config_from_dict(base)
    assert config.model.num_layers == 2 and config.model.vocab_size == 40
    student = build_student(config, mesh=None)
    assert student_decoder_config(config) == student.config
    assert student.config.num_layers == 2
    for name in ("attn/q/kernel", "mlp/down/kernel"):  # stacked [layers, ...]: rows 0 and 3
        got = np.asarray(_leaf(student, name))
        want = np.asarray(_leaf(teacher, name))[[0, 3]]
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(student.embed[...]), np.asarray(teacher.embed[...]))

    for model, match in [
        ({"init_from": "t", "keep_layers": [2, 1]}, r"model.keep_layers: must be a non-empty, "
         r"strictly increasing .* got \[2, 1\]"),
        ({"init_from": "t"}, r"model.keep_layers: goes with model.init_from"),
        ({"path": "p", "init_from": "t", "keep_layers": [0]},
         r"exactly one of .*; got path, init_from"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "model": model})


def _leaf(model, name):
    from flax import nnx

    hits = [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if name in "/".join(map(str, path))]
    assert len(hits) == 1, (name, len(hits))
    return hits[0][...]
