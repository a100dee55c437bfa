"""fused_distill equals the materialized-logits computation with the dense kernels.

Values and gradients (hidden, lm_head) for every divergence and every teacher form,
with temperature, soft-capping, a padded teacher vocabulary, a mask, the CE term, a
remainder chunk (N not a multiple of the chunk) and bf16 inputs. One compile per case:
the jitted functions are module-level and keyed on static arguments.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import (
    DenseTeacher,
    SampledTeacher,
    SparseTeacher,
    TeacherHead,
    cross_entropy,
    divergence,
    fused_distill,
    sampled_forward_kl,
    sparse_forward_kl,
)
from tests.losses import _refs
from tests.tolerances import TOL, assert_close

N, H, V, V_PAD, H_T, K = 37, 16, 48, 53, 12, 6
CHUNK = 8  # 37 = 4·8 + 5: a remainder chunk runs after the scan
CE_W = 0.3

DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("adaptive_kl", {"mu": 0.6}),
    ("alpha_beta_divergence", {"alpha": 0.6, "beta": 0.5}),
    ("soft_cross_entropy", {}),
]


def _inputs(rng, dtype=jnp.float32):
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32).astype(dtype)
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(N)])
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(N, V)) * 2.0, jnp.float32), -1)
    return dict(
        h=f(N, H), w=f(H, V, scale=0.4), t=f(N, V_PAD, scale=2.0), ht=f(N, H_T),
        wt=f(H_T, V_PAD, scale=0.6), y=jnp.asarray(rng.integers(0, V, N), jnp.int32),
        m=jnp.asarray(rng.random(N) > 0.3), ids=jnp.asarray(ids, jnp.uint16),  # as stored
        lp=jnp.take_along_axis(logp, jnp.asarray(ids), -1),
        counts=jnp.asarray(rng.integers(0, 4, (N, K)), jnp.int32))


def _teacher(form, d, tail=None):
    return {"dense": lambda: d["t"], "head": lambda: TeacherHead(d["ht"], d["wt"]),
            "sparse": lambda: SparseTeacher(d["ids"], d["lp"], tail),
            "sampled": lambda: SampledTeacher(d["ids"], d["counts"], 9)}[form]()


def _naive_div(z, form, d, name, temperature, kw, tail):
    """The dense kernels on materialized f32 logits; the teacher sliced to V."""
    if form == "dense":
        return divergence(name, z, d["t"][:, :V], temperature=temperature, **kw)
    if form == "head":
        t = d["ht"].astype(jnp.float32) @ d["wt"].astype(jnp.float32)
        return divergence(name, z, t[:, :V], temperature=temperature, **kw)
    if form == "sparse":
        return sparse_forward_kl(z / temperature, d["ids"], d["lp"], tail=tail)
    return sampled_forward_kl(z / temperature, d["ids"], d["counts"], num_samples=9)


@partial(jax.jit, static_argnames=("form", "name", "kw", "temperature", "cap", "tail"))
def _both(d, *, form, name, kw, temperature, cap, tail=None):
    """(value, grads) of the fused and of the naive mean loss, and the fused metrics."""
    kw = dict(kw)

    def fused(h, w, d):
        loss, metrics = fused_distill(h, w, _teacher(form, d, tail), targets=d["y"],
                                      mask=d["m"], divergence=name, temperature=temperature,
                                      ce_weight=CE_W, chunk_size=CHUNK, logit_softcap=cap, **kw)
        return loss.mean(), metrics

    def naive(h, w, d):
        z = jnp.dot(h.astype(jnp.float32), w.astype(jnp.float32))
        if cap is not None:
            z = cap * jnp.tanh(z / cap)
        div = _naive_div(z, form, d, name, temperature, kw, tail)
        m = d["m"].astype(jnp.float32)
        return jnp.sum(m * (div + CE_W * cross_entropy(z, d["y"]))) / jnp.sum(m), div

    (fv, metrics), fg = jax.value_and_grad(fused, (0, 1), has_aux=True)(d["h"], d["w"], d)
    (nv, ndiv), ng = jax.value_and_grad(naive, (0, 1), has_aux=True)(d["h"], d["w"], d)
    return fv, fg, nv, ng, metrics, ndiv


def _assert_match(out, dtype="float32", grad_tol=None):
    fv, fg, nv, ng, _, _ = out
    assert_close(fv, nv, dtype)
    for a, b in zip(fg, ng):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
        assert_close(np.asarray(a, np.float32), b, **{**TOL["grad"], **(grad_tol or {})})


@pytest.mark.parametrize("name,kw", DIVERGENCE_CASES, ids=[c[0] for c in DIVERGENCE_CASES])
def test_every_divergence_dense_teacher(rng, name, kw):
    d = _inputs(rng)
    out = _both(d, form="dense", name=name, kw=tuple(kw.items()), temperature=2.0, cap=6.0)
    _assert_match(out)


def test_plain_path_matches_float64_reference(rng):
    """T = 1, no cap, no CE: value and gradients against float64 NumPy formulas.

    Forward KL with weights w: L = Σ w KL(p‖q) / Σ w, ∂L/∂z = w (q − p) / Σ w,
    ∂L/∂h = ∂L/∂z Wᵀ, ∂L/∂W = hᵀ ∂L/∂z (independent of the kdjax code paths).
    """
    d = _inputs(rng)

    def loss(h, w):
        return fused_distill(h, w, d["t"], mask=d["m"], chunk_size=CHUNK)[0].mean()

    value, (gh, gw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(d["h"], d["w"])
    h, w, m = _refs.f64(d["h"]), _refs.f64(d["w"]), np.asarray(d["m"], np.float64)
    z, t = h @ w, _refs.f64(d["t"])[:, :V]
    p, q = _refs.softmax(t), _refs.softmax(z)
    assert_close(value, np.sum(m * _refs.dense("forward_kl", z, t)) / m.sum())
    dz = m[:, None] * (q - p) / m.sum()
    assert_close(gh, dz @ w.T, **TOL["grad"])
    assert_close(gw, h.T @ dz, **TOL["grad"])


@pytest.mark.parametrize("form,tail", [("head", None), ("sparse", "renormalize"),
                                       ("sparse", "bucket"), ("sampled", None)])
def test_teacher_forms(rng, form, tail):
    d = _inputs(rng)
    name, kw = ("jsd", (("beta", 0.4),)) if form == "head" else ("forward_kl", ())
    out = _both(d, form=form, name=name, kw=kw, temperature=1.5, cap=5.0, tail=tail)
    _assert_match(out)
    metrics, ndiv = out[4], out[5]
    assert_close(metrics["divergence"].sum, np.sum(np.asarray(d["m"]) * np.asarray(ndiv)),
                 rtol=1e-5, atol=1e-5)


def test_teacher_head_gets_no_gradient(rng):
    d = _inputs(rng)

    def loss(h, w, ht, wt):
        return fused_distill(h, w, TeacherHead(ht, wt), chunk_size=CHUNK)[0].mean()

    grads = jax.jit(jax.grad(loss, (0, 2, 3)))(d["h"], d["w"], d["ht"], d["wt"])
    assert np.abs(np.asarray(grads[0])).max() > 0
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_bf16_inputs(rng):
    d = _inputs(rng, jnp.bfloat16)
    out = _both(d, form="dense", name="forward_kl", kw=(), temperature=1.0, cap=None)
    fv, fg = out[0], out[1]
    assert fv.dtype == jnp.float32 and fg[0].dtype == jnp.bfloat16 and fg[1].dtype == jnp.bfloat16
    # Logits accumulate in f32 from the same bf16 values as the naive path; the gradient
    # matmuls take dz rounded to bf16 (≈ 2⁻⁸ relative) and return bf16.
    _assert_match(out, "bfloat16", grad_tol=dict(rtol=3e-2, atol=2e-3))


def test_metrics_split_and_no_targets(rng):
    d = _inputs(rng)
    loss, metrics = jax.jit(partial(fused_distill, chunk_size=CHUNK, ce_weight=CE_W))(
        d["h"], d["w"], d["t"], targets=d["y"], mask=d["m"])
    assert_close(loss.sum, metrics["divergence"].sum + CE_W * metrics["ce"].sum)
    assert_close(loss.count, np.sum(np.asarray(d["m"])))
    loss2, metrics2 = jax.jit(fused_distill)(d["h"], d["w"], d["t"])  # auto chunk size
    assert float(metrics2["ce"].count) == 0.0 and float(loss2.count) == N


def test_grad_modes_agree(rng):
    d = _inputs(rng)

    def f(h, w, mode):
        return fused_distill(h, w, d["t"], targets=d["y"], ce_weight=0.5, chunk_size=CHUNK,
                             grad_mode=mode)[0].mean()

    fwd = jax.jit(jax.value_and_grad(partial(f, mode="forward"), (0, 1)))(d["h"], d["w"])
    rec = jax.jit(jax.value_and_grad(partial(f, mode="recompute"), (0, 1)))(d["h"], d["w"])
    assert_close(fwd[0], rec[0])
    for a, b in zip(fwd[1], rec[1]):
        assert_close(a, b, **TOL["grad"])


def test_grad_of_scaled_loss_scales(rng):
    """The backward pass multiplies the stashed gradients by the incoming cotangent."""
    d = _inputs(rng)
    g = jax.jit(jax.grad(lambda h: 3.0 * fused_distill(h, d["w"], d["t"])[0].sum))(d["h"])
    g1 = jax.jit(jax.grad(lambda h: fused_distill(h, d["w"], d["t"])[0].sum))(d["h"])
    assert_close(g, 3.0 * np.asarray(g1), **TOL["grad"])


def test_dense_teacher_equals_the_plain_array(rng):
    d = _inputs(rng)
    f = lambda t: jax.value_and_grad(lambda h, w: fused_distill(
        h, w, t, targets=d["y"], mask=d["m"], ce_weight=CE_W, chunk_size=CHUNK,
        divergence="jsd", beta=0.3)[0].mean(), (0, 1))(d["h"], d["w"])
    plain, wrapped = jax.jit(f)(d["t"]), jax.jit(f)(DenseTeacher(d["t"]))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wrapped)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunk_slicing_paths_agree_exactly(rng, dtype, monkeypatch):
    """On XLA:CPU 16-bit rows are cut by lax.switch branches of static slices, or, past
    ChunkRows.MAX_SWITCH_CHUNKS chunks, as uint16 bits; f32 rows by dynamic_slice. The
    path changes no bit of the result."""
    from kdjax.losses.fused.kernel import ChunkRows

    d = _inputs(rng, dtype)
    ht = TeacherHead(d["ht"], d["wt"])

    def run():
        f = lambda h, w, t: fused_distill(h, w, t, targets=d["y"], mask=d["m"],
                                          ce_weight=CE_W, chunk_size=CHUNK)[0].mean()
        return [jax.jit(jax.value_and_grad(f, (0, 1)))(d["h"], d["w"], t) for t in (d["t"], ht)]

    switch = run()
    monkeypatch.setattr(ChunkRows, "MAX_SWITCH_CHUNKS", 0)
    bits = run()
    for a, b in zip(jax.tree.leaves(switch), jax.tree.leaves(bits)):
        np.testing.assert_array_equal(a, b)
