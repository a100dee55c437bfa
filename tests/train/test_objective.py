"""The objective: formula vs float64 NumPy, fused == naive, hidden/attention terms, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import Decoder, DecoderConfig
from kdjax.train.objective import Objective, merge
from kdjax.train.state import init_projections, split_model
from tests.tolerances import assert_close

V, B, L = 48, 2, 8
MANIFEST_SAMPLED = (("mode", "sampled"), ("num_samples", 16))
MANIFEST_DENSE = (("mode", "dense"),)


def _model(hidden, layers, seed):
    cfg = DecoderConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_layers=layers, num_heads=2, tie_word_embeddings=True)
    return Decoder(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def models():
    student, teacher = _model(16, 2, 0), _model(24, 2, 1)
    return split_model(student), split_model(teacher)


def _batch(rng, *, teacher_logits=False, sampled=False):
    toks = rng.integers(0, V, (B, L + 1)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[1, 5:] = 2  # two packed documents in row 1
    mask = rng.random((B, L)) > 0.25
    pos = np.where(seg == 2, np.arange(L) - 5, np.arange(L)).astype(np.int32)
    batch = dict(tokens=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask, segment_ids=seg,
                 positions=pos)
    if teacher_logits:
        batch["teacher_logits"] = rng.normal(0, 2, (B, L, V)).astype(np.float32)
    if sampled:
        ids = np.stack([rng.permutation(V)[:6] for _ in range(B * L)]).reshape(B, L, 6)
        counts = rng.multinomial(16, np.full(6, 1 / 6), size=(B, L)).astype(np.int32)
        batch.update(teacher_ids=ids.astype(np.uint8), teacher_counts=counts)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _params(split, proj=None):
    return {"model": split[1], "proj": proj or {}}


def _logsoftmax64(x, t=1.0):
    x = np.asarray(x, np.float64) / t
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _loss(obj, split, batch, teacher=None, proj=None, step=0):
    loss, metrics = obj(_params(split, proj), batch, graphdef=split[0], step=jnp.int32(step),
                        teacher=teacher, rest=split[2])
    return loss, metrics


def test_dense_store_formula_matches_float64_reference(models, rng):
    student, _ = models
    batch = _batch(rng, teacher_logits=True)
    alpha, temp = 0.3, 2.0
    obj = Objective(alpha=alpha, temperature=temp, t2_scaling=True, fused=False,
                    store_manifest=MANIFEST_DENSE)
    loss, metrics = _loss(obj, student, batch)
    logits = merge(*student)(batch["tokens"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"]).logits
    lq, lp = _logsoftmax64(logits, temp), _logsoftmax64(batch["teacher_logits"], temp)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    ce = -np.take_along_axis(_logsoftmax64(logits), np.asarray(batch["targets"])[..., None],
                             -1)[..., 0]
    m = np.asarray(batch["loss_mask"], np.float64)
    expected = ((alpha * ce + (1 - alpha) * temp**2 * kl) * m).sum() / m.sum()
    assert_close(loss.mean(), expected, rtol=2e-5)
    assert_close(metrics["kd"].mean(), (kl * m).sum() / m.sum(), rtol=2e-5)
    assert_close(loss.count, m.sum())


def test_sampled_store_estimator_matches_float64_reference(models, rng):
    student, _ = models
    batch = _batch(rng, sampled=True)
    obj = Objective(alpha=0.0, fused=False, store_manifest=MANIFEST_SAMPLED)
    loss, _ = _loss(obj, student, batch)
    logits = merge(*student)(batch["tokens"], segment_ids=batch["segment_ids"]).logits
    lq = np.take_along_axis(_logsoftmax64(logits), np.asarray(batch["teacher_ids"], np.int64),
                            -1)
    t = np.asarray(batch["teacher_counts"], np.float64) / 16
    terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - lq), 0).sum(-1)
    m = np.asarray(batch["loss_mask"], np.float64)
    assert_close(loss.mean(), (terms * m).sum() / m.sum(), rtol=2e-5)


@pytest.mark.parametrize("source", ["sampled", "online", "ce_only"])
def test_fused_equals_naive_value_and_grad(models, rng, source):
    student, teacher = models
    batch = _batch(rng, teacher_logits=source == "dense", sampled=source == "sampled")
    kw = dict(alpha=0.25, temperature=1.5, t2_scaling=True)
    if source == "online":
        kw.update(teacher_source="online")
    elif source == "ce_only":
        kw = dict(alpha=1.0, teacher_source="none")
    else:
        kw.update(store_manifest=MANIFEST_SAMPLED if source == "sampled" else MANIFEST_DENSE)
    t = teacher if source == "online" else None

    def value_and_grad(fused):
        obj = Objective(fused=fused, **kw)
        f = lambda p: _loss(obj, (student[0], p, student[2]), batch, teacher=t)[0].mean()
        return jax.jit(jax.value_and_grad(f))(student[1])

    (v_f, g_f), (v_n, g_n) = value_and_grad(True), value_and_grad(False)
    assert_close(v_f, v_n, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_n)):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_hidden_and_attention_terms_match_reference(models, rng):
    student, teacher = models
    batch = _batch(rng)
    proj = init_projections({"1_2": (16, 24)}, seed=0)
    obj = Objective(alpha=1.0, teacher_source="online", fused=False, hidden_layers=((1, 2),),
                    hidden_weight=0.5, attention_layers=((1, 0),), attention_weight=2.0)
    loss, metrics = _loss(obj, student, batch, teacher=teacher, proj=proj)
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    s_out = merge(*student)(batch["tokens"], hidden_layers=(1,), attention_layers=(1,), **kw)
    t_out = merge(*teacher)(batch["tokens"], hidden_layers=(2,), attention_layers=(0,), **kw)
    hs = np.asarray(s_out.hidden_states[1], np.float64) @ np.asarray(proj["1_2"], np.float64)
    mse = ((hs - np.asarray(t_out.hidden_states[2], np.float64)) ** 2).mean(-1)
    seg = np.asarray(batch["segment_ids"])
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & np.tril(np.ones((L, L), bool))
    ls = _logsoftmax64(np.where(allowed, s_out.attention_scores[1], -np.inf))
    lt = _logsoftmax64(np.where(allowed, t_out.attention_scores[0], -np.inf))
    lt, ls = np.where(allowed, lt, 0.0), np.where(allowed, ls, 0.0)
    att = np.where(allowed, np.exp(lt) * (lt - ls), 0.0).sum(-1).mean(1)
    m = np.asarray(batch["loss_mask"], np.float64)
    assert_close(metrics["hidden"].mean(), (mse * m).sum() / m.sum(), rtol=2e-5)
    assert_close(metrics["attention"].mean(), (att * m).sum() / m.sum(), rtol=2e-5, atol=1e-6)
    expected = metrics["ce"].mean() + 0.5 * metrics["hidden"].mean() + 2.0 * metrics[
        "attention"].mean()
    assert_close(loss.mean(), float(expected), rtol=1e-5)


def test_schedules_move_alpha_and_temperature(models, rng):
    student, _ = models
    batch = _batch(rng, teacher_logits=True)
    obj = Objective(alpha=lambda s: 1.0 - s / 10.0, temperature=1.0, fused=False,
                    store_manifest=MANIFEST_DENSE)
    at0 = _loss(obj, student, batch, step=0)[1]
    at5 = _loss(obj, student, batch, step=5)
    assert_close(at0["loss"].mean(), at0["ce"].mean())
    assert_close(at5[0].mean(), 0.5 * at0["ce"].mean() + 0.5 * at5[1]["kd"].mean(), rtol=1e-5)


@pytest.mark.parametrize("kw, match", [  # values are the config's to check (test_config)
    (dict(teacher_source="offline"), r"teacher_source: unknown value 'offline'"),
    (dict(alpha=0.5, teacher_source="none"), "needs a teacher"),
    (dict(attention_layers=((0, 0),), attention_weight=1.0), "online"),
])
def test_impossible_objective_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Objective(**kw)


def test_missing_teacher_hidden_in_batch_names_the_key(models, rng):
    student, _ = models
    obj = Objective(alpha=1.0, fused=False, hidden_layers=((1, 3),), hidden_weight=1.0,
                    hidden_projection=False)
    with pytest.raises(ValueError, match="teacher_hidden_3"):
        _loss(obj, student, _batch(rng))


def test_config_builds_the_objective(tmp_path):
    from kdjax.train.config import config_from_dict

    cfg = config_from_dict({
        "run_dir": str(tmp_path), "steps": 10, "global_batch_size": 8,
        "model": {"init": dict(vocab_size=V, hidden_size=16, intermediate_size=32,
                               num_layers=2, num_heads=2)},
        "data": {"train": "x"}, "store": {"path": "s"},
        "objective": {"divergence": "jsd", "divergence_kwargs": {"beta": 0.3},
                      "temperature": 2.0, "alpha": 0.2, "t2_scaling": True,
                      "alpha_schedule": {"kind": "linear", "end": 0.6},
                      "hidden": {"weight": 0.5, "layer_map": {1: 3}, "loss": "cosine"}}})
    obj = cfg.objective.build(cfg.teacher_source, cfg.steps, {"mode": "dense", "vocab_size": V})
    assert obj.divergence == "jsd" and dict(obj.divergence_kwargs) == {"beta": 0.3}
    assert obj.temperature == 2.0 and obj.t2_scaling and obj.teacher_source == "store"
    assert_close(obj.alpha(jnp.int32(5)), 0.4)
    assert obj.hidden_layers == ((1, 3),) and obj.hidden_loss == "cosine"
    assert dict(obj.store_manifest) == {"mode": "dense"}
    assert obj.projection_shapes(16, 32) == {"1_3": (16, 32)}
