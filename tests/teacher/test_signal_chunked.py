"""kdjax.teacher.signal.chunked_signal and the block-wise top-k: the logits and the signal
a chunk of positions at a time must give the whole-array signal (top-k ids of `lax.top_k`,
the same draws per (seed, row)), and the precompute step must use it unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.sharding import make_mesh
from kdjax.teacher import PrecomputeConfig, signal
from kdjax.teacher.step import build_step
from tests.teacher import helpers
from tests.tolerances import assert_close

B, L, H, V = 4, 12, 8, 700  # V = 10 blocks of 64 + a padded one of 60
N, U, K = 16, 8, 3  # 2·K·64 = 384 <= V: the block-wise top-k path


def _logp64(x, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _exact_inputs(rng):
    """hidden and head of small integers (× 1/8): every logit is exact in f32 whatever the
    order of the matmul's sums, so chunked and whole logits are bit-identical."""
    hidden = rng.integers(-3, 4, size=(B, L, H)) / 8
    head = rng.integers(-3, 4, size=(H, V)) / 8
    return jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32)


_chunked = jax.jit(signal.chunked_signal, static_argnames=(
    "mode", "k", "num_samples", "num_slots", "temperature", "chunk_len"))
_sampled = jax.jit(signal.sampled_signal, static_argnames=("num_samples", "num_slots",
                                                           "temperature"))
_topk = jax.jit(signal.topk_signal, static_argnames=("k", "temperature"))


@pytest.mark.parametrize("chunk_len", [4, 5, 12])  # 3 chunks, 3 chunks padded, 1 chunk
def test_chunked_equals_whole_signal(rng, chunk_len):
    hidden, head = _exact_inputs(rng)
    logits = hidden @ head
    keys = signal.row_keys(5, np.arange(20, 20 + B))
    want = _sampled(logits, keys, num_samples=N, num_slots=U, temperature=0.7)
    got = _chunked(hidden, head, "sampled", keys=keys, num_samples=N, num_slots=U,
                   temperature=0.7, chunk_len=chunk_len)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    want = _topk(logits, k=K, temperature=0.7)
    got = _chunked(hidden, head, "topk", k=K, temperature=0.7, chunk_len=chunk_len)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    # and against float64
    logp = _logp64(np.asarray(hidden, np.float64) @ np.asarray(head, np.float64), 0.7)
    ids = np.asarray(got["ids"]).astype(np.int64)
    assert_close(got["logprobs"], np.take_along_axis(logp, ids, -1))
    kept = np.take_along_axis(np.exp(logp), ids, -1).sum(-1)
    assert_close(got["tail"], 1 - kept, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_blockwise_topk_is_lax_top_k_with_ties(rng, temperature):
    """Integer logits in a small range: ties inside and across blocks, -inf ids, a padded
    last block. Ids must be exactly `lax.top_k`'s (ties to the smaller id), for k up to
    the block-wise limit V / (2·64)."""
    v = 3000
    x = rng.integers(-6, 3, size=(3, 5, v)).astype(np.float32)
    x[0, 0] = -np.inf
    x[0, 0, [5, 70, 2999]] = 1.0  # only 3 finite ids: the rest of the top k is -inf ties
    x[0, 1, :] = 0.0  # all tied
    x[1, 0, -40:] = 9.0  # the top k in the padded last block
    x[1, 1, :] = 0.0
    x[1, 1, 2900] = 5.0  # the top block comes last in id order; the rest ties at 0
    x = jnp.asarray(x)
    for k in (1, 7, 23):
        out = jax.jit(lambda x, k=k: signal.topk_signal(x, k=k, temperature=temperature))(x)
        vals, ids = jax.lax.top_k(x / temperature, k)
        np.testing.assert_array_equal(np.asarray(out["ids"]), np.asarray(ids))
        _, ids_logp = jax.lax.top_k(signal.teacher_logprobs(x, temperature), k)
        np.testing.assert_array_equal(np.asarray(out["ids"]), np.asarray(ids_logp))
        logp = _logp64(x, temperature)
        want = np.argsort(-logp, -1, kind="stable")[..., :k]
        np.testing.assert_array_equal(np.asarray(out["ids"]), want)
        assert_close(out["logprobs"], np.take_along_axis(logp, want, -1))
        p = np.exp(logp)
        tail = p.sum(-1) - np.take_along_axis(p, want, -1).sum(-1)
        assert_close(out["tail"], tail, rtol=1e-5, atol=1e-6)
    assert float(out["tail"][0, 0]) == 0.0  # k = 23 > 3 finite ids: no mass left


def test_sampled_draws_follow_unnormalized_logits(rng):
    """The draws see softmax(x), whatever shift x has: x and x + 100 (exp would overflow
    without the max shift) draw the same ids, and never a -inf id."""
    x = rng.normal(size=(2, 6, 200)).astype(np.float32) * 3
    x[..., ::7] = -np.inf
    keys = signal.row_keys(1, [3, 4])
    fn = jax.jit(lambda x, k: signal.sampled_signal(x, k, num_samples=N, num_slots=N))
    a, b = fn(jnp.asarray(x), keys), fn(jnp.asarray(x + 100), keys)
    ids, counts = np.asarray(a["ids"]).astype(np.int64), np.asarray(a["counts"])
    assert np.all(ids[counts > 0] % 7 != 0)
    np.testing.assert_array_equal(counts.sum(-1), N)
    same = np.mean(np.all(np.asarray(b["ids"]) == ids, -1))
    assert same > 0.9  # x + 100 rounds differently: a rare draw near a CDF step may move
    p = np.exp(_logp64(x))
    assert_close(a["mass"], np.take_along_axis(p, ids, -1).sum(-1, where=counts > 0),
                 rtol=1e-5)


def test_chunk_len_prefers_divisors():
    assert signal._chunk_len(256, 16) == 16
    assert signal._chunk_len(12, 5) == 4  # a divisor in [3, 5]
    assert signal._chunk_len(13, 5) == 5  # none: padded
    assert signal._chunk_len(3, 16) == 3
    assert signal._chunk_len(7, 0) == 1


def test_chunked_bad_arguments_raise(rng):
    hidden, head = _exact_inputs(rng)
    with pytest.raises(ValueError, match="sampled and topk signals, got 'dense'"):
        signal.chunked_signal(hidden, head, "dense")
    with pytest.raises(ValueError, match=f"k=701 with V={V}"):
        signal.chunked_signal(hidden, head, "topk", k=V + 1)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        signal.chunked_signal(hidden, head, "topk", k=2, temperature=-1.0)


@pytest.fixture(scope="module")
def tiny_teacher():
    return helpers.tiny_decoder(vocab_size=V, hidden=16, layers=1)


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_step_chunks_like_the_whole_signal(tiny_teacher, rng, mode):
    """The precompute step with 2-token chunks (16 positions per device → 8 chunks), batch
    sharded over 4 devices: its signal is the whole-logits signal of the teacher. The
    teacher's chunked and whole matmuls may round differently, so sampled draws are
    compared on most positions and top-k ids everywhere (random logits have no near-ties)."""
    mesh = make_mesh(data=4, devices=jax.devices()[:4])
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    cfg = PrecomputeConfig(mode=mode, k=K, num_samples=N, num_slots=U, seed=9,
                           temperature=1.5)
    b, length = 8, 16
    tokens = jnp.asarray(rng.integers(0, V, size=(b, length)), jnp.int32)
    seg = jnp.ones((b, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    rows = jnp.arange(100, 100 + b, dtype=jnp.int32)
    with jax.set_mesh(mesh):
        step, state = build_step(tiny_teacher, cfg, sharding, (), chunk_tokens=4)
        out = step(state, *(jax.device_put(a, sharding) for a in (tokens, seg, pos, rows)))
    assert out["ids"].sharding.is_equivalent_to(sharding, 3)
    graphdef, params = nnx.split(tiny_teacher)
    logits = jax.jit(lambda p, t, s, q: nnx.merge(graphdef, p)(
        t, segment_ids=s, positions=q).logits)(params, tokens, seg, pos)
    if mode == "sampled":
        want = _sampled(logits, signal.row_keys(9, rows), num_samples=N, num_slots=U,
                        temperature=1.5)
        same = np.all(np.asarray(out["ids"]) == np.asarray(want["ids"]), -1)
        assert same.mean() > 0.95
        for name in ("counts", "distinct", "dropped"):
            np.testing.assert_array_equal(np.asarray(out[name])[same],
                                          np.asarray(want[name])[same])
        assert_close(np.asarray(out["mass"])[same], np.asarray(want["mass"])[same])
    else:
        want = _topk(logits, k=K, temperature=1.5)
        np.testing.assert_array_equal(np.asarray(out["ids"]), np.asarray(want["ids"]))
        assert_close(out["logprobs"], want["logprobs"], atol=1e-5)
        assert_close(out["tail"], want["tail"], atol=1e-6, rtol=1e-4)
        np.testing.assert_array_equal(np.asarray(out["distinct"]), K)
    assert out["mass"].shape == (b, length)
