"""Attention kernels: the XLA reference against `jax.nn.dot_product_attention` in the
formulation the cuDNN path uses, Pallas splash attention (interpreted on CPU, and compiled
ahead of time for a TPU topology when libtpu is installed), the CPU-fast and plain forms
of the reference, and kernel selection."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import platform
from kdjax.models import DecoderConfig, init_decoder
from kdjax.models.attention import attend, attention_mask
from kdjax.models.fused_attention import (
    cudnn_attention,
    dot_product_masks,
    resolve,
    splash_attention,
)
from kdjax.sharding import make_mesh
from tests.tolerances import TOL, assert_close

N_HEADS, KV, D = 4, 2, 8


def _inputs(rng, b, length, d=D, segments=None):
    q = jnp.asarray(rng.standard_normal((b, length, N_HEADS, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, length, KV, d)), jnp.float32)
            for _ in range(2))
    if segments is None:  # row 0: two segments; row 1: one segment then padding
        cut = length // 3
        segments = np.stack([np.r_[np.ones(cut), 2 * np.ones(length - cut)],
                             np.r_[np.ones(length - cut), np.zeros(cut)]] * (b // 2))
    seg = jnp.asarray(segments, jnp.int32)
    return q, k, v, seg


def _reference(q, k, v, seg, window):
    slots = jnp.arange(q.shape[1])
    mask = attention_mask(seg, seg, slots, slots, window)
    return attend(q, k, v, mask, KV, jnp.float32)[0]


def _values_and_grads(fn, q, k, v, seg, c):
    """`(out, grads wrt q, k, v)` of `sum(out * c)` over non-padding rows (padding rows are
    arbitrary in every kernel)."""
    live = (seg != 0)[:, :, None, None]

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(live, out * c, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return jnp.where(live, out, 0.0), grads


@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_dot_product_attention(rng, window):
    """The reference equals `jax.nn.dot_product_attention(implementation="xla")` given the
    mask / is_causal / local_window_size that the cuDNN path passes."""
    q, k, v, seg = _inputs(rng, 2, 24)
    c = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    want = _values_and_grads(lambda q, k, v: _reference(q, k, v, seg, window), q, k, v, seg, c)
    got = _values_and_grads(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, **dot_product_masks(seg, window), implementation="xla"), q, k, v, seg, c)
    assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, **TOL["grad"])


@pytest.mark.parametrize("window", [None, 40])
def test_splash_matches_reference(rng, window):
    """Splash attention in Pallas' interpreter, through the shard_map that splits batch
    over (data, fsdp) and heads over tensor, against the reference: values and grads."""
    q, k, v, seg = _inputs(rng, 4, 128)
    c = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    want = _values_and_grads(lambda q, k, v: _reference(q, k, v, seg, window), q, k, v, seg, c)
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        got = jax.jit(lambda q, k, v: _values_and_grads(
            lambda q, k, v: splash_attention(q, k, v, seg, window, interpret=True),
            q, k, v, seg, c))(q, k, v)
    assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_plain_and_cpu_fast_forms_agree(rng):
    """Traced for a TPU (heads kept as their own axes, no row views) and for the CPU
    (head-major fold, row-view reductions), the decoder gives the same values, hidden
    states and scores."""
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=N_HEADS, num_kv_heads=KV, qk_norm=True, sliding_window=6,
                        attention_impl="xla")
    model = init_decoder(cfg, seed=1)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    outs = {}
    for target in ("cpu", "tpu"):
        with platform.target(target):  # a fresh jit per target: the trace depends on it
            outs[target] = jax.jit(lambda t: model(t, hidden_layers=(1,),
                                                   attention_layers=(0, 1)))(tokens)
    cpu, tpu = outs["cpu"], outs["tpu"]
    assert_close(tpu.logits, cpu.logits, rtol=1e-5, atol=1e-5)
    assert_close(tpu.hidden_states[1], cpu.hidden_states[1], rtol=1e-5, atol=1e-5)
    for i in (0, 1):
        assert_close(tpu.attention_scores[i], cpu.attention_scores[i], rtol=1e-5, atol=1e-5)


def test_kernel_selection():
    with platform.target("cpu"):
        assert resolve("auto", 256) == "xla"
        with pytest.raises(ValueError, match="'cudnn' runs only on NVIDIA GPUs.*'cpu'"):
            resolve("cudnn", 256)
    with platform.target("gpu"):
        assert resolve("auto", 100) == "cudnn"
    with platform.target("tpu"):
        assert resolve("auto", 256) == "splash"
        assert resolve("auto", 100) == "xla"  # splash needs multiples of 128
        with pytest.raises(ValueError, match="multiple of 128, got 100"):
            resolve("splash", 100)
    assert resolve("xla", 100) == "xla"
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        DecoderConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, attention_impl="flash")


def test_cudnn_on_cpu_is_a_clear_error():
    model = init_decoder(DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                       num_layers=1, num_heads=2, attention_impl="cudnn"))
    with pytest.raises(ValueError, match="attention_impl='cudnn' runs only on NVIDIA GPUs"):
        model(jnp.ones((1, 8), jnp.int32))


def test_cudnn_path_lowers_for_gpu(rng):
    q, k, v, seg = _inputs(rng, 2, 16)
    with pytest.raises(ValueError, match="needs bfloat16 or float16 compute, got float32"):
        cudnn_attention(q, k, v, seg, None)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    try:
        with platform.target("gpu"):
            text = jax.jit(cudnn_attention, static_argnums=4).lower(q, k, v, seg, 5).as_text()
    except Exception as e:  # jax checks for a cuDNN install while tracing
        pytest.skip(f"cannot lower the cuDNN kernel without a GPU here: {e}")
    assert "cudnn" in text.lower()


# ------------------------------------------ ahead-of-time compile for a TPU topology
TPU_CFG = DecoderConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")


def _tpu_mesh():
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices
    except Exception as e:  # libtpu missing, or cannot start here
        pytest.skip(f"no TPU topology for ahead-of-time compilation (install the `tpu` "
                    f"extra, libtpu): {type(e).__name__}: {e}")
    return make_mesh(data=1, fsdp=2, tensor=2, devices=devices)


@pytest.mark.parametrize("window", [None, 128])
def test_splash_step_compiles_for_tpu(window):
    """A sharded forward+backward of a bf16 decoder, compiled for a v5e 2x2 slice: the
    attention runs as the splash kernel (a Mosaic custom call), no all-gather has a token
    axis, and the `[V, H]` tables are never gathered in f32."""
    from tests.models.hlo import abstract_model, all_gathers

    mesh = _tpu_mesh()
    # the windowed case also runs each scanned layer under jax.checkpoint
    cfg = TPU_CFG.replace(sliding_window=window, remat="none" if window is None else "full")
    batch, length = 8, 384  # no parameter dimension is 8 or a multiple of 384
    graphdef, state, tokens = abstract_model(cfg, mesh, batch, length)

    def loss(state, tokens):
        from flax import nnx

        out = nnx.merge(graphdef, state)(tokens, segment_ids=(tokens > 3).astype(jnp.int32))
        return jnp.sum(out.logits.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss)).lower(state, tokens).compile().as_text()
    assert re.search(r'custom_call_target="tpu_custom_call"', text)
    gathers = all_gathers(text)
    assert gathers, "expected the FSDP weight gathers"
    assert not [g for g in gathers if any(d == batch or d % length == 0 for d in g[1])]
    table = {(cfg.vocab_size, cfg.hidden_size), (cfg.hidden_size, cfg.vocab_size)}
    assert not [g for g in gathers if g[0] == "f32" and g[1] in table], gathers
