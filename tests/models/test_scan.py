"""Stacked, scanned layers: the scan equals the Python loop over the same parameters
(values, requested hidden states and scores, gradients, KV-cache generation), and the
program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import Decoder, DecoderConfig, generate, init_cache, init_decoder, with_config
from tests.tolerances import TOL, assert_close

CFG = DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_heads=4, num_kv_heads=2, qk_norm=True, attention_bias=True,
                    sliding_window=7)
HIDDEN, SCORES = (0, 1, 4), (1,)  # spans: [0, 1) scanned, block 1 alone, [2, 4) scanned


@pytest.fixture(scope="module")
def models():
    scanned = init_decoder(CFG, seed=3)
    return scanned, with_config(scanned, scan_layers=False)


def _outputs_and_grads(model, tokens, segment_ids):
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids,
                                         hidden_layers=HIDDEN, attention_layers=SCORES)
        keep = (segment_ids != 0)[:, :, None]
        total = jnp.sum(jnp.where(keep, out.logits, 0.0) ** 2)
        total += sum(jnp.sum(jnp.where(keep, h, 0.0)) for h in out.hidden_states.values())
        total += sum(jnp.sum(jax.nn.softmax(s, axis=-1)[..., 0])
                     for s in out.attention_scores.values())
        return total, out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)


def test_scan_equals_loop(models, rng):
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 10)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3], jnp.int32)
    (loss_s, out_s), grads_s = _outputs_and_grads(models[0], tokens, segment_ids)
    (loss_l, out_l), grads_l = _outputs_and_grads(models[1], tokens, segment_ids)
    assert sorted(out_s.hidden_states) == list(HIDDEN)
    assert sorted(out_s.attention_scores) == list(SCORES)
    assert_close(loss_s, loss_l)
    assert_close(out_s.logits, out_l.logits)
    for i in HIDDEN:
        assert_close(out_s.hidden_states[i], out_l.hidden_states[i])
    for i in SCORES:
        assert_close(out_s.attention_scores[i], out_l.attention_scores[i])
    flat_l = dict(nnx.to_flat_state(grads_l))
    for path, g in nnx.to_flat_state(grads_s):
        got, want = np.asarray(g.get_value()), np.asarray(flat_l[path].get_value())
        assert np.isfinite(got).all(), path
        # k's bias has a zero gradient in exact arithmetic (softmax ignores a per-query
        # constant): what is left is rounding, so the floor scales with the tensor
        assert_close(got, want, rtol=TOL["grad"]["rtol"], atol=1e-6 * np.abs(want).max(),
                     err_msg=str(path))


def test_generation_scan_equals_loop(models, rng):
    prompts = rng.integers(3, CFG.vocab_size, (3, 6)).astype(np.int32)
    kw = dict(prompt_lengths=[6, 3, 5], max_new_tokens=6, eos_token_id=None)
    scanned, looped = (generate(m, prompts, **kw) for m in models)
    np.testing.assert_array_equal(np.asarray(scanned.tokens), np.asarray(looped.tokens))


def test_cache_is_stacked_on_the_layer_axis():
    cache = init_cache(CFG, batch=2, length=16)
    shape = (CFG.num_layers, 2, 16, CFG.num_kv_heads, CFG.head_dim)
    assert cache["layers"]["k"].shape == cache["layers"]["v"].shape == shape


def _program_size(cfg, **call):
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, **call).logits

    # operations (lines), not characters: "12x32" is longer than "3x32"
    return len(jax.jit(forward).lower(state, tokens).as_text().splitlines())


@pytest.mark.parametrize("call", [{}, dict(hidden_layers=(1,), attention_layers=(1,))])
def test_program_does_not_grow_with_depth(call):
    shallow, deep = (CFG.replace(num_layers=n, remat="full") for n in (6, 24))
    size = _program_size(shallow, **call)
    assert _program_size(deep, **call) == size
    loop = _program_size(shallow.replace(scan_layers=False), **call)
    assert _program_size(deep.replace(scan_layers=False), **call) > 2 * loop
