"""vocab_parallel_distill equals fused_distill on 8 fake CPU devices in three layouts.

Each layout compiles one function that evaluates four teacher forms (dense with a padded
vocabulary, TeacherHead, sparse with the bucket tail, sampled) with CE, mask, softcap
and temperature, and compares values and gradients with the single-device kernel.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import (
    SampledTeacher,
    SparseTeacher,
    TeacherHead,
    fused_distill,
    vocab_parallel_distill,
)
from kdjax.sharding import DATA, TENSOR, make_mesh
from tests.tolerances import TOL, assert_close

N, H, V, V_PAD, H_T, K = 48, 16, 64, 67, 12, 5
CASES = (  # (teacher form, divergence, kwargs)
    ("dense", "jsd", (("beta", 0.3),)),
    ("head", "skew_reverse_kl", (("alpha", 0.2),)),
    ("sparse", "forward_kl", ()),
    ("sampled", "forward_kl", ()),
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(V, K, replace=False) for _ in range(N)]), jnp.int32)
    logp = jax.nn.log_softmax(f(N, V, scale=2.0), -1)
    return dict(h=f(N, H), w=f(H, V, scale=0.4), t=f(N, V_PAD, scale=2.0), ht=f(N, H_T),
                wt=f(H_T, V_PAD, scale=0.5), y=jnp.asarray(rng.integers(0, V, N), jnp.int32),
                m=jnp.asarray(rng.random(N) > 0.25), ids=ids,
                lp=jnp.take_along_axis(logp, ids, -1),
                counts=jnp.asarray(rng.integers(0, 3, (N, K)), jnp.int32))


def _teacher(form, d):
    return {"dense": lambda: d["t"], "head": lambda: TeacherHead(d["ht"], d["wt"]),
            "sparse": lambda: SparseTeacher(d["ids"], d["lp"], "bucket"),
            "sampled": lambda: SampledTeacher(d["ids"], d["counts"], 6)}[form]()


def _all_forms(d, loss_fn, forms=tuple(c[0] for c in CASES)):
    out = []
    for form, name, kw in (c for c in CASES if c[0] in forms):
        def f(h, w, form=form, name=name, kw=kw):
            loss, metrics = loss_fn(h, w, _teacher(form, d), targets=d["y"], mask=d["m"],
                                    divergence=name, temperature=1.5, ce_weight=0.4,
                                    logit_softcap=5.0, chunk_size=4, **dict(kw))
            return loss.mean(), metrics
        out.append(jax.value_and_grad(f, (0, 1), has_aux=True)(d["h"], d["w"]))
    return out


@pytest.fixture(scope="module")
def unsharded(data):
    return jax.jit(partial(_all_forms, loss_fn=fused_distill))(data)


# Every form in the mixed layout; subsets (to bound compile time) in the pure ones.
LAYOUTS = [(dict(data=2, tensor=4), ("dense", "head", "sparse", "sampled")),
           (dict(data=8), ("dense", "head")),
           (dict(data=1, tensor=8), ("dense", "sparse", "sampled"))]


@pytest.mark.parametrize("layout,forms", LAYOUTS, ids=["data2xtensor4", "data8", "tensor8"])
def test_vocab_parallel_equals_unsharded(data, unsharded, layout, forms):
    mesh = make_mesh(**layout)
    fn = partial(vocab_parallel_distill, mesh=mesh, vocab_axis=TENSOR, data_axis=DATA)
    sharded = jax.jit(partial(_all_forms, loss_fn=fn, forms=forms))(data)
    expected = [u for c, u in zip(CASES, unsharded) if c[0] in forms]
    cases = [c for c in CASES if c[0] in forms]
    for (form, _, _), ((sv, sm), sg), ((uv, um), ug) in zip(cases, sharded, expected):
        assert_close(sv, uv, err_msg=form)
        assert_close(sm["ce"].sum, um["ce"].sum, err_msg=form)
        assert_close(sm["divergence"].sum, um["divergence"].sum, err_msg=form)
        for a, b in zip(sg, ug):
            assert_close(a, b, **TOL["grad"], err_msg=form)


def test_vocab_parallel_errors(data):
    mesh = make_mesh(data=2, tensor=4)
    kw = dict(mesh=mesh, vocab_axis=TENSOR, data_axis=DATA)
    with pytest.raises(ValueError, match="adaptive_kl"):
        vocab_parallel_distill(data["h"], data["w"], data["t"], divergence="adaptive_kl", **kw)
    with pytest.raises(ValueError, match="does not divide"):
        vocab_parallel_distill(data["h"], data["w"][:, :62], data["t"], **kw)
    with pytest.raises(ValueError, match="tokens do not divide"):
        vocab_parallel_distill(data["h"][:47], data["w"], data["t"][:47], **kw)
    with pytest.raises(ValueError, match="not an axis"):
        vocab_parallel_distill(data["h"], data["w"], data["t"], mesh=mesh, vocab_axis="model")


def test_sharded_ce_only_and_top1_match_float64(data):
    """teacher=None (CE only) and with_top1 over data2×fsdp4 with the lm_head gradient
    reduce-scattered over fsdp: values against float64 NumPy, gradients against the
    unsharded kernel."""
    from kdjax.losses import sharded_fused_distill
    from kdjax.sharding import FSDP

    mesh = make_mesh(data=2, fsdp=4)
    kw = dict(mesh=mesh, data_axis=(DATA, FSDP), grad_scatter_axis=FSDP)
    h, w, y, m = (np.asarray(data[k], np.float64) for k in ("h", "w", "y", "m"))
    z = h @ w
    logq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    ce_ref = -(m * logq[np.arange(N), y.astype(int)]).sum()
    top_ref = (m * (z.argmax(-1) == np.asarray(data["t"])[:, :V].argmax(-1))).sum()

    def ce(h, w, fn):
        loss, _ = fn(h, w, None, targets=data["y"], mask=data["m"], ce_weight=1.0)
        return loss.sum

    sharded = partial(sharded_fused_distill, **kw)
    value, grads = jax.jit(jax.value_and_grad(partial(ce, fn=sharded), (0, 1)))(
        data["h"], data["w"])
    ref_grads = jax.jit(jax.grad(partial(ce, fn=fused_distill), (0, 1)))(data["h"], data["w"])
    assert_close(value, ce_ref)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, **TOL["grad"])
    _, metrics = jax.jit(lambda h, w: sharded(h, w, data["t"], targets=data["y"],
                                              mask=data["m"], with_top1=True))(
        data["h"], data["w"])
    assert_close(metrics["top1_agreement"].sum, top_ref)
    with pytest.raises(ValueError, match="teacher=None"):
        sharded(data["h"], data["w"], None)


def test_partition_specs_of_each_form(data):
    """Per-token arrays split over the data axis; vocabulary columns over the vocab axis;
    ids are global, so every vocab shard holds all of them."""
    from jax.sharding import PartitionSpec as P

    from kdjax.losses import DenseTeacher
    from kdjax.losses.fused.teachers import NoTeacher

    specs = lambda t: t.partition_specs(DATA, TENSOR)
    assert specs(DenseTeacher(data["t"])) == DenseTeacher(P(DATA, TENSOR))
    head = specs(TeacherHead(data["ht"], data["wt"], 30.0))
    assert head == TeacherHead(P(DATA, None), P(None, TENSOR), 30.0)
    sparse = specs(SparseTeacher(data["ids"], data["lp"], "bucket"))
    assert sparse == SparseTeacher(P(DATA, None), P(DATA, None), "bucket")
    sampled = specs(SampledTeacher(data["ids"], data["counts"], 6))
    assert sampled == SampledTeacher(P(DATA, None), P(DATA, None), 6)
    assert specs(NoTeacher()) == NoTeacher()
