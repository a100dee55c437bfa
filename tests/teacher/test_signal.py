"""kdjax.teacher.signal: sampled / top-k / dense teacher signals against float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.sharding import make_mesh
from kdjax.teacher import signal
from tests.tolerances import assert_close

# one jitted sampled_signal shared by the tests below (same shapes → one compilation)
_sampled = jax.jit(signal.sampled_signal,
                   static_argnames=("num_samples", "num_slots", "temperature"))


def _logp64(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature,block", [(1.0, 64), (2.0, 5)])
def test_sampled_counts_are_unbiased(rng, temperature, block):
    """E[counts/N] = p. Over R·N independent draws the mean of counts/N for id v has
    standard deviation σ_v = sqrt(p_v (1 − p_v) / (R·N)); we require every id within
    5σ_v + 1e-6 (a false alarm has probability < 1e-5 across the 12 ids). block=5 cuts
    V=12 into 3 blocks, the last one padded, so the two-level search is exercised."""
    v, n, rows, length = 12, 8, 64, 64
    logits = rng.normal(size=v) * 2.0
    logits[3] = -np.inf  # an impossible token is never drawn
    logits[10] = -np.inf  # (also inside the last, padded block)
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (rows, length, v))
    keys = signal.row_keys(7, np.arange(rows))
    draws = jax.jit(lambda x, k: jax.vmap(lambda lp, kk: signal.draw(lp, kk, n, block=block))(
        signal.teacher_logprobs(x, temperature), k))(x, keys)
    ids, counts, _ = signal.compact(draws, n)
    freq = np.zeros(v)
    np.add.at(freq, np.asarray(ids).astype(np.int64).ravel(), np.asarray(counts).ravel())
    total = rows * length * n
    assert freq.sum() == total
    p = np.exp(_logp64(logits, temperature))
    sigma = np.sqrt(p * (1 - p) / total)
    np.testing.assert_array_less(np.abs(freq / total - p), 5 * sigma + 1e-6)
    assert freq[3] == 0 and freq[10] == 0
    # the check can fail: against p at the other temperature it does
    p_other = np.exp(_logp64(logits, 3.0 - temperature))
    sigma_other = np.sqrt(p_other * (1 - p_other) / total)
    assert np.any(np.abs(freq / total - p_other) > 5 * sigma_other + 1e-6)


def test_compact_matches_numpy_unique(rng):
    n, u = 16, 4
    draws = rng.integers(0, 9, size=(5, 7, n))
    ids, counts, distinct = jax.jit(signal.compact, static_argnums=1)(jnp.asarray(draws), u)
    for pos in np.ndindex(draws.shape[:-1]):
        uniq, cnt = np.unique(draws[pos], return_counts=True)
        order = np.lexsort((uniq, -cnt))[:u]  # largest count first, ties by smaller id
        want_ids = np.zeros(u, np.int64)
        want_cnt = np.zeros(u, np.int64)
        want_ids[:len(order)], want_cnt[:len(order)] = uniq[order], cnt[order]
        np.testing.assert_array_equal(np.asarray(ids[pos]), want_ids)
        np.testing.assert_array_equal(np.asarray(counts[pos]), want_cnt)
        assert int(distinct[pos]) == len(uniq)


def test_compact_pads_when_slots_exceed_draws():
    ids, counts, distinct = signal.compact(jnp.asarray([[4, 4, 1]]), 5)
    np.testing.assert_array_equal(np.asarray(ids), [[4, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(counts), [[2, 1, 0, 0, 0]])
    assert int(distinct[0]) == 2


def test_sampled_overflow_is_counted(rng):
    x = jnp.asarray(rng.normal(size=(8, 4, 33)) * 0.1, jnp.float32)  # near uniform
    out = _sampled(x, signal.row_keys(0, np.arange(8)), num_samples=16, num_slots=4)
    counts = np.asarray(out["counts"]).astype(np.int64)
    np.testing.assert_array_equal(counts.sum(-1) + np.asarray(out["dropped"]), 16)
    assert np.all(np.asarray(out["distinct"]) > 4) and np.all(np.asarray(out["dropped"]) > 0)
    assert np.all(np.diff(counts, axis=-1) <= 0)
    p = np.exp(_logp64(np.asarray(x)))
    kept = np.take_along_axis(p, np.asarray(out["ids"]).astype(np.int64), -1).sum(-1)
    assert_close(out["mass"], kept)


def test_sampling_is_a_function_of_seed_and_row(rng):
    x = jnp.asarray(rng.normal(size=(8, 4, 33)), jnp.float32)
    rows = np.arange(10, 18)
    fn = functools.partial(_sampled, num_samples=16, num_slots=4)
    a = fn(x, signal.row_keys(3, rows))
    perm = rng.permutation(8)
    b = fn(x[perm], signal.row_keys(3, rows[perm]))
    np.testing.assert_array_equal(np.asarray(a["ids"])[perm], np.asarray(b["ids"]))
    np.testing.assert_array_equal(np.asarray(a["counts"])[perm], np.asarray(b["counts"]))
    xs = jax.device_put(x, NamedSharding(make_mesh(data=8), PartitionSpec("data")))
    c = fn(xs, signal.row_keys(3, rows))
    np.testing.assert_array_equal(np.asarray(a["ids"]), np.asarray(c["ids"]))
    d = fn(x, signal.row_keys(4, rows))
    assert not np.array_equal(np.asarray(a["ids"]), np.asarray(d["ids"]))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_topk_equals_lax_top_k_and_float64(rng, temperature):
    v, k = 50, 6
    x = rng.normal(size=(3, 4, v)) * 3
    x[0, 0, :] = -30.0
    x[0, 0, :k] = 30.0  # tail mass ~ 1e-24·V: must come out ≈ 0, not 1 − Σp rounding
    out = jax.jit(lambda x: signal.topk_signal(x, k=k, temperature=temperature))(
        jnp.asarray(x, jnp.float32))
    logp = _logp64(x, temperature)
    want_ids = np.argsort(-logp, -1, kind="stable")[..., :k]
    ref_vals, ref_ids = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(x, jnp.float32)
                                                         / temperature), k)
    np.testing.assert_array_equal(np.asarray(out["ids"]), np.asarray(ref_ids))
    np.testing.assert_array_equal(np.asarray(out["ids"]), want_ids)
    assert out["ids"].dtype == np.uint8
    assert_close(out["logprobs"], np.take_along_axis(logp, want_ids, -1))
    tail = 1 - np.exp(np.take_along_axis(logp, want_ids, -1)).sum(-1)
    tail[0, 0] = np.exp(logp[0, 0, k:]).sum()
    np.testing.assert_allclose(np.asarray(out["tail"]), tail, rtol=1e-4, atol=1e-7)
    assert float(out["tail"][0, 0]) < 1e-20


def test_topk_tail_counts_ties_left_out():
    x = jnp.asarray([[5.0, 3.0, 3.0, 3.0, 1.0, -jnp.inf]])
    out = signal.topk_signal(x, k=2)
    p = np.exp(_logp64(np.asarray(x)))
    assert_close(out["tail"], [p[0, 2:].sum()])
    assert_close(out["mass"] + out["tail"], [1.0])


def test_topk_full_vocab_has_no_tail(rng):
    x = jnp.asarray(rng.normal(size=(2, 9)), jnp.float32)
    out = signal.topk_signal(x, k=9)
    np.testing.assert_array_equal(np.asarray(out["tail"]), 0.0)
    assert_close(jnp.exp(out["logprobs"]).sum(-1), np.ones(2))


@pytest.mark.parametrize("vocab,dtype", [(255, np.uint8), (256, np.uint16),
                                         (65535, np.uint16), (65536, np.uint32),
                                         (151_936, np.uint32)])
def test_id_dtype_never_wraps(vocab, dtype):
    assert signal.id_dtype(vocab) == dtype
    assert np.iinfo(dtype).max >= vocab - 1


def test_large_vocab_ids_are_32_bit(rng):
    v = 70_000
    x = np.full((1, 2, v), -20.0, np.float32)
    x[0, :, v - 5:] = rng.normal(size=(2, 5)) + 10  # mass on ids > 65535
    out = _sampled(jnp.asarray(x), signal.row_keys(0, [0]), num_samples=16, num_slots=8)
    assert out["ids"].dtype == np.uint32
    ids = np.asarray(out["ids"])[np.asarray(out["counts"]) > 0]
    assert ids.min() >= v - 5  # (the end-to-end test covers top-k at V = 70,000)


def test_bad_arguments_raise(rng):
    x = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        signal.topk_signal(x, k=2, temperature=0.0)
    with pytest.raises(ValueError, match="k=6 with V=5"):
        signal.topk_signal(x, k=6)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        signal.id_dtype(0)
