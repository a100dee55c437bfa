"""The sampled teacher signal t̂ = counts/N is unbiased with U = N slots and biased with
U < N (why `num_slots` defaults to N), and `kdjax precompute` warns when draws are dropped.

Statistical thresholds come from Bernstein's inequality, which holds for every p (no
normal approximation, so rare ids are covered too): for X ~ Binomial(M, p),
P(|X − M·p| ≥ t) ≤ 2·exp(−t² / (2·(M·p·(1 − p) + t/3))). Over one sampled batch the
draws of every position are independent draws from the same p, so the total count of id
v over all positions is Binomial(M, p_v) with M = positions·N draws.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import forward_kl, sampled_forward_kl
from kdjax.teacher import PrecomputeConfig, open_teacher_store, precompute, signal
from tests.teacher import helpers

V = 50
ROWS, LENGTH = 64, 64  # 4096 positions: one key per row, LENGTH positions per row
POSITIONS = ROWS * LENGTH
# Each statistical check below fails falsely with probability ≤ ALPHA (a union bound over
# every id it tests); about 10 checks in this file, so a false failure of the file < 1e-5.
ALPHA = 1e-6

_sampled = jax.jit(signal.sampled_signal,
                   static_argnames=("num_samples", "num_slots", "temperature"))


def _probs(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def _bernstein(p, draws: int, alpha: float) -> np.ndarray:
    """Half-width h with P(|X/draws − p| ≥ h) ≤ alpha for X ~ Binomial(draws, p), each p."""
    lam = np.log(2.0 / alpha)
    var = draws * np.asarray(p, np.float64) * (1 - np.asarray(p, np.float64))
    return (lam / 3 + np.sqrt(lam ** 2 / 9 + 2 * lam * var)) / draws


def _sample(logits, num_samples: int, num_slots: int, seed: int = 1):
    """The project's sampling path on one distribution repeated at every position:
    (dense t̂ [POSITIONS, V] f64, ids, counts, dropped [POSITIONS])."""
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (ROWS, LENGTH, V))
    out = _sampled(x, signal.row_keys(seed, np.arange(ROWS)), num_samples=num_samples,
                   num_slots=num_slots)
    ids, counts = out["ids"], out["counts"]
    flat_ids = np.asarray(ids).astype(np.int64).reshape(POSITIONS, num_slots)
    flat_counts = np.asarray(counts).astype(np.int64).reshape(POSITIONS, num_slots)
    t = np.zeros((POSITIONS, V))
    np.add.at(t, (np.arange(POSITIONS)[:, None], flat_ids), flat_counts)  # empty: count 0
    dropped = np.asarray(out["dropped"]).reshape(POSITIONS)
    np.testing.assert_array_equal(flat_counts.sum(-1) + dropped, num_samples)
    return t / num_samples, ids, counts, dropped


def _unbiased_violations(t_mean, p, draws: int) -> np.ndarray:
    """Ids whose mean t̂ is further from p than an unbiased estimate strays with
    probability ALPHA (Bonferroni over the V ids: ALPHA / V each)."""
    return np.flatnonzero(np.abs(t_mean - p) > _bernstein(p, draws, ALPHA / len(p)))


_peaked = np.random.default_rng(11).normal(size=V) * 3.0
_peaked[7] = -np.inf  # an impossible id (p = 0): never drawn
CASES = {"peaked": _peaked, "flat": np.random.default_rng(12).normal(size=V) * 0.3}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mean_of_counts_over_n_is_p_with_u_equal_n(case):
    """U = N: every draw is kept, so E[counts/N] = p. Each id's mean t̂ over the 4096
    positions (M = 131072 draws) must lie within its Bernstein half-width at ALPHA / V
    (false failure ≤ 1e-6 for the whole check), e.g. ±0.0068 at p = 0.2 and ±0.00058 at
    p = 1e-3 (about 6σ). The check has power: it rejects the teacher at T = 1.25 instead of 1."""
    n = 32
    logits = CASES[case]
    p = _probs(logits)
    t, _, _, dropped = _sample(logits, n, n)
    assert not dropped.any()
    np.testing.assert_allclose(t.sum(-1), 1.0)
    t_mean = t.mean(0)
    bad = _unbiased_violations(t_mean, p, POSITIONS * n)
    assert bad.size == 0, (bad, t_mean[bad], p[bad])
    assert t[:, p == 0].sum() == 0
    if case == "peaked":
        other = _probs(logits / 1.25)
        assert _unbiased_violations(t_mean, other, POSITIONS * n).size > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_mean_sampled_kl_gradient_is_the_forward_kl_gradient(case):
    """The mean over positions of ∇_z sampled_forward_kl (z: student logits) equals the
    exact forward-KL gradient q − p, computed in float64 and checked against
    jax.grad(forward_kl). Per position ∇_z = q − t̂ (counts sum to N), so the mean's error
    is p − mean t̂: each id within its Bernstein half-width at ALPHA / V plus 1e-6 for the
    f32 loss (false failure ≤ 1e-6)."""
    n = 32
    logits = CASES[case]
    p = _probs(logits)
    _, ids, counts, _ = _sample(logits, n, n, seed=2)
    z = np.random.default_rng(13).normal(size=V)
    zb = jnp.broadcast_to(jnp.asarray(z, jnp.float32), (ROWS, LENGTH, V))
    grad = jax.jit(jax.grad(lambda s, i, c: sampled_forward_kl(s, i, c, num_samples=n).sum()))
    g_mean = np.asarray(grad(zb, ids, counts), np.float64).reshape(POSITIONS, V).mean(0)
    exact = _probs(z) - p  # d/dz KL(p‖softmax z)
    finite = np.where(np.isfinite(logits), logits, -1e30)  # forward_kl's -inf convention
    lib = jax.grad(lambda s: forward_kl(s, jnp.asarray(finite, jnp.float32)))(
        jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(lib, np.float64), exact, atol=1e-6)
    tol = _bernstein(p, POSITIONS * n, ALPHA / V) + 1e-6
    np.testing.assert_array_less(np.abs(g_mean - exact), tol)


def test_fewer_slots_than_draws_bias_the_signal():
    """U = 4 < N = 16 drops draws, and t̂ = counts/N is then biased, beyond any sampling
    noise (each threshold: the Bernstein half-width of an unbiased estimate, ALPHA):

    - flat teacher (uniform over V = 50): most ids are drawn once and equal counts keep the
      smaller id, so the expected loss's minimizer q* = E[t̂] / E[Σ t̂] gives ids 0–4 about
      2.3x their mass (measured q* ≈ 0.23 against p = 0.1, noise ±0.006): a bias towards
      small token ids;
    - Zipf-like teacher (ranks scattered over the ids): q* gives the 5 most likely ids more
      than p (measured ≈ 0.77 against 0.51), and at the exact optimum q = p, where the
      forward-KL gradient is 0, the mean sampled gradient pushes the head's logits up
      (Σ_head ∇ ≈ −0.15; an unbiased estimate stays within ±0.011), with L1 norm
      ≤ 2·(mean dropped / N) as `kdjax.teacher.signal` states.
    The per-id check that passes with U = N fails here."""
    n, u = 16, 4
    draws = POSITIONS * n

    flat = np.zeros(V)
    p = _probs(flat)
    t, *_ = _sample(flat, n, u)
    t_mean = t.mean(0)
    q_star = t_mean / t_mean.sum()
    small = slice(0, 5)
    assert q_star[small].sum() - p[small].sum() > _bernstein(p[small].sum(), draws, ALPHA)
    assert _unbiased_violations(t_mean, p, draws).size > 0

    zipf = -np.log1p(np.random.default_rng(14).permutation(V).astype(np.float64))
    p = _probs(zipf)
    t, ids, counts, dropped = _sample(zipf, n, u)
    d = dropped.mean() / n  # the manifest's dropped_sample_rate of this batch
    assert d > 0.1
    t_mean = t.mean(0)
    head = np.argsort(-p)[:5]
    p_head = p[head].sum()
    q_star = t_mean / t_mean.sum()
    assert q_star[head].sum() - p_head > _bernstein(p_head, draws, ALPHA)
    assert np.all(t_mean <= p + _bernstein(p, draws, ALPHA / V))  # E[t̂_v] ≤ p_v: drops only
    assert _unbiased_violations(t_mean, p, draws).size > 0

    # the student at the teacher's distribution: the exact gradient is 0
    zb = jnp.broadcast_to(jnp.asarray(np.log(p), jnp.float32), (ROWS, LENGTH, V))
    g = jax.grad(lambda s: sampled_forward_kl(s, ids, counts, num_samples=n).sum())(zb)
    g_mean = np.asarray(g, np.float64).reshape(POSITIONS, V).mean(0)
    assert g_mean[head].sum() < -_bernstein(p_head, draws, ALPHA) - 1e-6
    # ‖mean ∇‖₁ ≤ 2·d + noise: ‖p − t̄‖₁ = d + 2·Σ (t̄ − p)₊, the positive part noise only
    noise = 2 * _bernstein(p, draws, ALPHA / V).sum()
    assert np.abs(g_mean).sum() <= 2 * d + noise + 1e-5


def test_overflow_warning_text():
    """The user's run: N=64, U=32, 23.29% of positions overflowed, 3.60% of draws lost."""
    from kdjax.teacher.progress import overflow_warning

    manifest = {"mode": "sampled", "num_samples": 64, "num_slots": 32,
                "stats": {"overflow_rate": 0.2329, "dropped_sample_rate": 0.036,
                          "dropped_samples": 1_234_567, "overflow_positions": 99}}
    text = overflow_warning(manifest)
    for part in ("3.60% of the sampled draws were dropped", "23.29% of positions",
                 "U=32", "N=64", "biased", "num_slots=null", "num_slots=64", "--overwrite"):
        assert part in text, (part, text)
    tiny = {**manifest, "stats": {**manifest["stats"], "dropped_sample_rate": 3e-7}}
    assert "3e-05% of the sampled draws" in overflow_warning(tiny)  # never shown as 0.00%
    none = {**manifest, "stats": {**manifest["stats"], "dropped_samples": 0,
                                  "dropped_sample_rate": 0.0, "overflow_rate": 0.0}}
    assert overflow_warning(none) is None
    assert overflow_warning({**manifest, "mode": "topk"}) is None
    assert overflow_warning({**manifest, "stats": {}}) is None  # not finalized yet


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return helpers.write_token_store(tmp_path_factory.mktemp("unbiased") / "tokens",
                                     num_rows=8, shard_rows=8)


def _run(tokens, out, **extra):
    # temperature 4 flattens the tiny teacher (peaked by its ×40 head) so 16 draws hit
    # more than 2 ids at most positions
    cfg = PrecomputeConfig(tokens=tokens, out=str(out), mode="sampled", num_samples=16,
                           temperature=4.0, seed=0, batch_size=8, shard_rows=8,
                           dtype="float32", teacher_fingerprint="tiny-teacher-seed-0",
                           progress=False, **extra)
    return cfg, precompute(cfg, model=helpers.tiny_decoder())


def test_precompute_warns_when_draws_are_dropped(tokens, tmp_path, capsys):
    """U=2 < N=16: the run says on stderr, with progress off, how many draws were dropped,
    N, U and the fix; the manifest records the same numbers; `kdjax inspect` repeats it."""
    from kdjax.cli import main

    _, summary = _run(tokens, tmp_path / "u2", num_slots=2)
    err = capsys.readouterr().err
    stats = open_teacher_store(tmp_path / "u2").manifest["stats"]
    assert stats["dropped_samples"] > 0 and stats["overflow_positions"] > 0
    assert 0 < stats["dropped_sample_rate"] < 1
    assert "kdjax precompute: warning:" in err, err
    assert f"{stats['dropped_sample_rate']:.2%} of the sampled draws were dropped" in err
    for part in ("N=16", "U=2", "num_slots=null", "num_slots=16"):
        assert part in err, (part, err)
    assert summary["overflow_warning"] in err
    assert main(["inspect", str(tmp_path / "u2"), "--no-check"]) == 0
    assert "WARNING: " in capsys.readouterr().out


def test_precompute_default_keeps_every_draw_and_does_not_warn(tokens, tmp_path, capsys):
    """num_slots unset: U = N, nothing dropped, no warning."""
    cfg, summary = _run(tokens, tmp_path / "default")
    assert cfg.num_slots == 16
    err = capsys.readouterr().err
    m = open_teacher_store(tmp_path / "default").manifest
    assert m["num_slots"] == 16 and m["stats"]["dropped_samples"] == 0
    assert m["stats"]["overflow_rate"] == 0.0
    assert summary["overflow_warning"] is None and "warning" not in err
