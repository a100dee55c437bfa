"""Bad arguments to the fused kernels fail at trace time with a message naming them."""

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import (
    SampledTeacher,
    SparseTeacher,
    TeacherHead,
    fused_distill,
    fused_sequence_logprobs,
)

N, H, V = 8, 4, 10


@pytest.fixture
def x(rng):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, (N, 3)), jnp.int32)
    return dict(h=f(N, H), w=f(H, V), t=f(N, V), ids=ids, y=jnp.zeros(N, jnp.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(divergence="kl"), "unknown divergence 'kl'"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=-4), "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), "chunk_size must be a positive int"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(logit_softcap=-1.0), "logit_softcap must be a positive"),
    (dict(ce_weight=0.5), "ce_weight=0.5 needs targets"),
    (dict(mask=np.ones(N - 1, bool)), "mask has shape"),
    (dict(targets=jnp.zeros(N, jnp.float32)), "targets must be an integer array"),
    (dict(divergence="jsd", beta=1.5), "beta must lie in"),
])
def test_bad_arguments(x, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_distill(x["h"], x["w"], x["t"], **kwargs)


def test_bad_shapes_and_teachers(x, rng):
    h, w, t, ids = x["h"], x["w"], x["t"], x["ids"]
    with pytest.raises(ValueError, match="feature size 4"):
        fused_distill(h, w.T, t)
    with pytest.raises(ValueError, match="smaller than the student's 10"):
        fused_distill(h, w, t[:, :9])
    with pytest.raises(ValueError, match=r"teacher \(dense logits\) has shape"):
        fused_distill(h, w, t[:5])
    with pytest.raises(TypeError, match="teacher must be dense logits"):
        fused_distill(h, w, [1, 2])
    with pytest.raises(ValueError, match="needs the full teacher distribution"):
        fused_distill(h, w, SparseTeacher(ids, jnp.zeros((N, 3))), divergence="jsd")
    with pytest.raises(ValueError, match="tail must be one of"):
        fused_distill(h, w, SparseTeacher(ids, jnp.zeros((N, 3)), "drop"))
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        fused_distill(h, w, SampledTeacher(ids, jnp.ones((N, 3), jnp.int32), 0))
    with pytest.raises(ValueError, match="counts has shape"):
        fused_distill(h, w, SampledTeacher(ids, jnp.ones((N, 2), jnp.int32), 4))
    with pytest.raises(ValueError, match=r"TeacherHead.lm_head must be \[H_t=3"):
        fused_distill(h, w, TeacherHead(jnp.ones((N, 3)), jnp.ones((4, V))))
    with pytest.raises(ValueError, match="targets has shape"):
        fused_sequence_logprobs(h, w, jnp.zeros(N + 1, jnp.int32))
