"""Decoder properties: logical axes on every parameter, tied heads, remat policies give
identical gradients, bf16 compute with f32 master weights, finite gradients through
padding, sharded forward equals unsharded."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax.models import DecoderConfig, init_decoder, weight_decay_mask, with_config
from kdjax.sharding import LOGICAL_RULES, make_mesh, shard_model, variable_logical_axes
from tests.tolerances import TOL, assert_close

CFG = DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, qk_norm=True, attention_bias=True)


@pytest.fixture(scope="module")
def model():
    return init_decoder(CFG, seed=0)


def _batch(rng):
    tokens = rng.integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    segment_ids = np.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3], np.int32)
    return jnp.asarray(tokens), jnp.asarray(segment_ids)


def _logits(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids).logits


_forward = nnx.jit(_logits)  # module level: one compile per graph, shared across tests


def _loss(model, tokens, segment_ids):
    logits = model(tokens, segment_ids=segment_ids).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return jnp.sum(nll * mask) / jnp.sum(mask)


def test_every_param_has_logical_axes(model):
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert sum(v.get_value().size for _, v in flat) == CFG.num_params
    for path, var in flat:
        axes = variable_logical_axes(var)
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert all(a in LOGICAL_RULES for a in axes), (path, axes)
        assert var.get_value().dtype == jnp.float32


def test_weight_decay_mask_marks_matrices_only(model):
    """Kernels and the embedding/lm_head tables decay; norm scales (`[layers, H]` once
    stacked) and biases (`[layers, heads, head_dim]`) do not."""
    state = nnx.state(model, nnx.Param)
    for tree in (state, nnx.to_pure_dict(state)):
        flat = jax.tree_util.tree_flatten_with_path(weight_decay_mask(tree))[0]
        decayed = {"/".join(str(k.key) for k in path if hasattr(k, "key"))
                   for path, leaf in flat if leaf}
        kernels = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)
                   if p[-1] == "kernel"}
        assert decayed == kernels | {"embed", "unembed"}


def test_init_decoder_is_seeded(model):
    again = init_decoder(CFG, seed=0)
    np.testing.assert_array_equal(np.asarray(again.embed[...]), np.asarray(model.embed[...]))
    other = init_decoder(CFG, seed=5)
    assert not np.allclose(np.asarray(other.embed[...]), np.asarray(model.embed[...]))
    std = float(np.asarray(other.layers.mlp.up.kernel[...][0]).std())
    assert 0.015 < std < 0.025  # N(0, 0.02²), transformers' initializer_range


def test_tied_lm_head_is_embedding_transpose():
    tied = init_decoder(CFG.replace(tie_word_embeddings=True), seed=1)
    with pytest.raises(ValueError, match="changes the parameters"):
        with_config(tied, tie_word_embeddings=False)
    assert tied.unembed is None
    np.testing.assert_array_equal(np.asarray(tied.lm_head()), np.asarray(tied.embed[...]).T)


_grad = nnx.jit(nnx.value_and_grad(_loss))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_gradients(model, policy, rng):
    tokens, segment_ids = _batch(rng)
    grad = _grad
    loss, ref = grad(model, tokens, segment_ids)
    remat = with_config(model, remat=policy)
    loss_r, got = grad(remat, tokens, segment_ids)
    assert_close(loss_r, loss)
    for (path, g), (_, r) in zip(nnx.to_flat_state(got), nnx.to_flat_state(ref)):
        assert np.isfinite(np.asarray(g.get_value())).all(), path
        assert_close(g.get_value(), r.get_value(), **TOL["grad"], err_msg=str(path))


def test_bf16_compute_keeps_f32_params_and_tracks_f32(model, rng):
    tokens, segment_ids = _batch(rng)
    bf16 = with_config(model, dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.float32
    got, want = _forward(bf16, tokens, segment_ids), _forward(model, tokens, segment_ids)
    assert got.dtype == jnp.bfloat16
    keep = np.asarray(segment_ids) != 0
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want))[keep]
    assert err.max() < 0.05 * np.abs(np.asarray(want)).max()


def test_sharded_forward_equals_unsharded(rng):
    tokens, segment_ids = _batch(rng)
    model = init_decoder(CFG, seed=2)
    want = _forward(model, tokens, segment_ids)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shard_model(model, mesh)
    assert model.layers.mlp.gate.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    direct = init_decoder(CFG, seed=2, mesh=mesh)  # created sharded, same values
    assert direct.embed[...].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(direct.embed[...]), np.asarray(model.embed[...]))
    with jax.set_mesh(mesh):
        got = _forward(model, tokens, segment_ids)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="hidden_layers contains 3"):
        model(jnp.ones((1, 4), jnp.int32), hidden_layers=(3,))
    with pytest.raises(ValueError, match="attention_layers contains 2"):
        model(jnp.ones((1, 4), jnp.int32), attention_layers=(2,))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        model(jnp.ones((4,), jnp.int32))


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads=3"),
    (dict(family="gpt2"), "family='gpt2'"),
    (dict(remat="sometimes"), "remat='sometimes'"),
    (dict(dtype="float33"), "dtype='float33'"),
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "low_freq_factor"),
])
def test_config_validation_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**change)


def test_norm_and_softmax_reductions_run_on_rows(model, rng):
    """Batch 1: RMSNorm (forward and backward) and the attention softmax reduce 2-D row
    views (`layers.rows`), not `[1, L, ...]` arrays, which XLA:CPU reduces up to ~6x
    slower. Checked on the lowered program of a forward + backward pass."""
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 12)), jnp.int32)
    graphdef, state = nnx.split(model)

    def loss(state):
        hidden = nnx.merge(graphdef, state)(tokens, return_logits=False).hidden
        return jnp.sum(hidden * hidden)  # (a full reduction: not one of the checked)

    text = jax.jit(jax.grad(loss)).lower(state).as_text()
    partial = []
    for dims, shape in re.findall(r"across dimensions = \[([\d, ]+)\] : \(tensor<([\dx]+)x",
                                  text):
        sizes, dims = [int(n) for n in shape.split("x")], [int(d) for d in dims.split(",")]
        rank = len(sizes)
        if rank - 1 in dims and len(dims) < rank and sizes[-1] > 1:  # over the last axis
            partial.append((rank, shape, dims))
    assert partial, "the norms' reductions were not found in the lowered program"
    assert [p for p in partial if p[0] > 2] == []
