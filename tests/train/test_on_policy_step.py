"""On-policy distillation in the train step (GKD, rkl_reward, MiniLLM).

Tiny student and teacher decoders (vocabulary 32), example rows in memory, the real
jitted step (`make_train_step`) with the rollout inside it.

Tolerances: the same steps on 1 device and on 8 fake devices give losses (rtol 1e-5,
atol 1e-6: rkl_reward's loss is a sum of terms of both signs) and gradient norms
(rtol 1e-5) equal, and parameters to atol 5e-5 (f32: only the order of
cross-device sums differs; the sampled completions are identical because every example
draws from its own key).
Micro-batching (1 vs 4 micro-batches) changes only the order of the gradient sums: the
loss and the gradient norm agree to rtol 1e-5, the parameters after one AdamW step to
atol 5e-5 (= lr/200: Adam's first update is lr·g/(|g| + ε), ill-conditioned where
|g| ≈ ε).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from kdjax import sharding as shd
from kdjax.models import Decoder, DecoderConfig
from kdjax.train.config import ConfigError, OnPolicyConfig, OptimizerConfig
from kdjax.train.layout import completion_layout
from kdjax.train.objective import Objective
from kdjax.train.on_policy import OnPolicyObjective
from kdjax.train.state import create_train_state, param_shardings, split_model
from kdjax.train.step import make_train_step

V, B, P, C, EOS = 32, 8, 5, 6, 3
STUDENT = DecoderConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_layers=1,
                        num_heads=4, num_kv_heads=2, eos_token_id=EOS)
TEACHER = DecoderConfig(vocab_size=V, hidden_size=48, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, eos_token_id=EOS)
OPT, STEPS = OptimizerConfig(lr=1e-2, warmup_steps=0), 10  # step 1 must move the params
JSD = Objective(divergence="jsd", divergence_kwargs=(("beta", 0.3),), teacher_source="online")


def _gkd(**kw):
    base = kw.pop("base", JSD)
    return OnPolicyObjective(base=base, loss=kw.pop("loss", "gkd"), max_new_tokens=C,
                             stop_ids=kw.pop("stop_ids", (EOS,)), pad_id=0, **kw)


def _examples(rng, n=B):
    plen = rng.integers(2, P + 1, n).astype(np.int32)
    clen = rng.integers(1, C + 1, n).astype(np.int32)
    prompt = rng.integers(4, V, (n, P)).astype(np.int32)
    comp = rng.integers(4, V, (n, C)).astype(np.int32)
    comp[np.arange(n), clen - 1] = EOS
    for r in range(n):
        prompt[r, plen[r]:] = 0
        comp[r, clen[r]:] = 0
    return dict(prompt=prompt, prompt_len=plen, completion=comp, completion_len=clen,
                example_id=rng.permutation(1000)[:n].astype(np.uint32))


def _teacher(mesh):
    t = Decoder(TEACHER, rngs=nnx.Rngs(7))
    graphdef, params, rest = split_model(t)
    params = jax.device_put(params, param_shardings(mesh, t))
    return graphdef, params, rest


_STEPS = {}  # compiled steps shared by the tests (compiling dominates their time)


def _run(mesh, objective, batches, *, micro=1):
    tx = OPT.build(STEPS)
    state = create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(0)), tx, mesh=mesh, seed=0)
    sharding = NamedSharding(mesh, shd.logical_to_spec(("batch",), mesh=mesh))
    key = (objective, mesh.devices.size, micro)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(objective, tx, state=state, mesh=mesh,
                                      batch_sharding=sharding, micro_batches=micro,
                                      teacher=_teacher(mesh))
    step = _STEPS[key]
    metrics = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, m = step(state, {k: jax.device_put(v, sharding) for k, v in b.items()})
            metrics.append(jax.device_get(m))
    return jax.device_get(state.params), metrics, step


@pytest.fixture(scope="module")
def mesh1():
    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [_examples(rng) for _ in range(2)]


def _laid_out(batch):
    laid = completion_layout(jnp.asarray(batch["prompt"]), jnp.asarray(batch["prompt_len"]),
                             jnp.asarray(batch["completion"]),
                             jnp.asarray(batch["completion_len"]), 0)
    return {k: np.asarray(v) for k, v in laid.items()}


def _same_tree(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if atol == 0.0:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_fraction_zero_is_offline_kd_on_dataset_completions(mesh1, batches):
    on, m_on, step = _run(mesh1, _gkd(fraction=0.0), batches)
    off, m_off, _ = _run(mesh1, JSD, [_laid_out(b) for b in batches])
    _same_tree(on, off)
    assert [float(m["loss"].mean()) for m in m_on] == [float(m["loss"].mean()) for m in m_off]
    assert step.jitted._cache_size() == 1
    assert float(m_on[0]["on_policy_fraction"].mean()) == 0.0


def test_replayed_rollout_is_offline_kd(mesh1, batches, monkeypatch):
    """λ = 1 with a sampler that returns the dataset completion = offline KD."""
    from kdjax.models import rollout as rollout_mod

    real = rollout_mod.rollout
    lookup = {}
    for b in batches:
        for r in range(B):
            key = tuple(int(t) for t in b["prompt"][r])
            lookup[key] = (b["completion"][r], b["completion_len"][r])

    def replay(model, prompts, prompt_len, keys, **kw):
        out = real(model, prompts, prompt_len, keys, **kw)
        comp, clen = jax.pure_callback(
            lambda p: tuple(np.stack(x).astype(np.int32) for x in zip(
                *[lookup[tuple(int(t) for t in r)] for r in np.asarray(p)])),
            (jax.ShapeDtypeStruct((prompts.shape[0], C), jnp.int32),
             jax.ShapeDtypeStruct((prompts.shape[0],), jnp.int32)), prompts)
        return dataclasses.replace(out, tokens=comp, lengths=clen)

    assert len(lookup) == B * len(batches), "the replay needs distinct prompts"
    monkeypatch.setattr(rollout_mod, "rollout", replay)
    obj = _gkd(fraction=1.0)
    _STEPS.pop((obj, 1, 1), None)  # compile with the replaying sampler, and keep it private
    try:
        on, _, _ = _run(mesh1, obj, batches)
    finally:
        _STEPS.pop((obj, 1, 1), None)
    off, _, _ = _run(mesh1, JSD, [_laid_out(b) for b in batches])
    _same_tree(on, off)


@pytest.mark.parametrize("loss", ["gkd", "minillm"])
def test_micro_batches_give_the_same_update(mesh1, batches, loss):
    obj = _gkd(loss=loss, fraction=0.6, gamma=0.9 if loss != "gkd" else 0.0,
               **({"base": dataclasses.replace(JSD, divergence="reverse_kl",
                                               divergence_kwargs=())}
                  if loss == "minillm" else {}))
    ref, m1, step = _run(mesh1, obj, batches[:1])
    assert np.isfinite(float(m1[0]["loss"].mean()))
    assert step.jitted._cache_size() == 1
    got, mk, _ = _run(mesh1, obj, batches[:1], micro=4)
    _same_tree(got, ref, atol=5e-5)
    for name in ("loss", "grad_norm"):  # Adam's first update is ~lr·sign(g): check |g| too
        a, b = mk[0][name], m1[0][name]
        a, b = (float(x.mean()) if hasattr(x, "mean") and callable(x.mean) else float(x)
                for x in (a, b))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_eight_devices_equal_one(mesh1, batches):
    mesh8 = shd.make_mesh(8, 1, 1)
    obj = _gkd(loss="rkl_reward", fraction=0.5, gamma=0.5, clip_eps=0.2)
    one, m1, _ = _run(mesh1, obj, batches)
    eight, m8, _ = _run(mesh8, obj, batches)
    _same_tree(one, eight, atol=5e-5)
    for a, b in zip(m1, m8, strict=True):
        np.testing.assert_allclose(float(a["loss"].mean()), float(b["loss"].mean()), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-5)
        assert float(a["completion_len"].mean()) == float(b["completion_len"].mean())


def test_completion_tokens_after_eos_do_not_count(mesh1, batches):
    """Garbage after a completion's end (pad == eos or not) leaves the step unchanged; the
    first completion token (predicted from the last prompt slot) changes it."""
    b = batches[0]
    messed = dict(b, completion=b["completion"].copy())
    for r in range(B):
        messed["completion"][r, b["completion_len"][r]:] = EOS  # pad == eos
    base, _, _ = _run(mesh1, _gkd(fraction=0.0), [b])
    same, _, _ = _run(mesh1, _gkd(fraction=0.0), [messed])
    _same_tree(base, same)
    first = dict(b, completion=b["completion"].copy())
    first["completion"][2, 0] = (first["completion"][2, 0] + 1) % V
    changed, _, _ = _run(mesh1, _gkd(fraction=0.0), [first])
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(changed),
                                                         jax.tree.leaves(base), strict=True))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gkd_loss_is_jsd_on_sampled_sequences_in_float64(mesh1, batches, beta):
    """The loss of a λ = 1 step equals β KL(p‖M) + (1−β) KL(q‖M) (float64) over the
    completion tokens of the sequences it sampled."""
    base = dataclasses.replace(JSD, divergence_kwargs=(("beta", beta),))
    obj = _gkd(base=base, fraction=1.0)
    student = Decoder(STUDENT, rngs=nnx.Rngs(0))
    teacher = _teacher(mesh1)
    graphdef, params, rest = split_model(student)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    prepared = obj.prepare({"model": params}, batch, graphdef=graphdef, rest=rest,
                           rng=jax.random.key_data(jax.random.key(0)), step=jnp.int32(0),
                           teacher=teacher)
    loss, _ = obj({"model": params}, prepared, graphdef=graphdef, step=jnp.int32(0),
                  teacher=teacher, rest=rest)
    z_s = np.asarray(student(prepared["tokens"], segment_ids=prepared["segment_ids"],
                             positions=prepared["positions"]).logits, np.float64)
    z_t = np.asarray(nnx.merge(*[x for x in teacher if x is not None])(
        prepared["tokens"], segment_ids=prepared["segment_ids"],
        positions=prepared["positions"]).logits, np.float64)

    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lq, lp = logsm(z_s), logsm(z_t)
    q, p = np.exp(lq), np.exp(lp)
    m = beta * p + (1 - beta) * q
    lm = np.log(m)
    per = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if beta in (0.0, 1.0):  # the catalog's end points: forward KL(p‖q), reverse KL(q‖p)
        per = (p * (lp - lq)).sum(-1) if beta == 0.0 else (q * (lq - lp)).sum(-1)
    mask = np.asarray(prepared["loss_mask"])
    assert mask.sum() == int(np.asarray(prepared["completion_len"]).sum())
    np.testing.assert_allclose(float(loss.sum), per[mask].sum(), rtol=2e-4, atol=1e-6)
    # swapping the mixture weights gives another value unless β = 0.5
    if beta == 0.3:  # TRL #3043's swapped mixture lies well outside the tolerance above
        lsw = np.log((1 - beta) * p + beta * q)
        swapped = (1 - beta) * (p * (lp - lsw)).sum(-1) + beta * (q * (lq - lsw)).sum(-1)
        assert abs(swapped[mask].sum() - per[mask].sum()) > 5 * 2e-4 * per[mask].sum()


@pytest.mark.parametrize("over, match", [
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": -0.1}, "fraction"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"source": "mixed", "loss": "gkd"}, "minillm"),
    ({"loss": "ppo"}, "loss"),
    ({"loss": "minillm", "updates_per_rollout": 0}, "updates_per_rollout"),
    ({"updates_per_rollout": 2}, "importance ratios"),
])
def test_bad_on_policy_settings_are_refused(over, match):
    kw = {"loss": "gkd", **over}
    with pytest.raises(ConfigError, match=match):
        OnPolicyConfig(**kw)


def test_several_stop_ids_end_completions_and_only_real_tokens_count(batches):
    """With stop ids {EOS, 9} a sampled completion ends at its first stop token (kept and
    trained on); later slots are padding and out of the loss."""
    obj = _gkd(fraction=1.0, stop_ids=(EOS, 9), temperature=2.0)
    student = Decoder(STUDENT, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(student)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    prep = jax.jit(lambda p, b: obj.prepare({"model": p}, b, graphdef=graphdef, rest=rest,
                                            rng=jnp.zeros(2, jnp.uint32), step=jnp.int32(3),
                                            teacher=None))(params, batch)
    tokens, mask = np.asarray(prep["tokens"]), np.asarray(prep["loss_mask"])
    plen, clen = np.asarray(batch["prompt_len"]), np.asarray(prep["completion_len"])
    finished = np.asarray(prep["finished"])
    seen_stop = 0
    for r in range(B):
        comp = tokens[r, plen[r]:plen[r] + clen[r]]
        stops = [j for j, t in enumerate(comp) if t in (EOS, 9)]
        if finished[r]:
            assert stops == [clen[r] - 1]  # ends at its first and only stop token
            seen_stop += 1
        else:
            assert not stops and clen[r] == C
        assert (tokens[r, plen[r] + clen[r]:] == 0).all()
        np.testing.assert_array_equal(np.flatnonzero(mask[r]),
                                      np.arange(plen[r] - 1, plen[r] + clen[r] - 1))
    assert seen_stop >= 1, "no row stopped: the check did not exercise stop ids"


def test_reused_rollout_is_k_updates_on_one_sample(mesh1, batches):
    """updates_per_rollout=2: one rollout from the starting params, then two AdamW updates
    on it (the second with importance ratios ≠ 1, clipped), as written out by hand."""
    import optax

    base = dataclasses.replace(JSD, divergence="reverse_kl", divergence_kwargs=())
    obj = _gkd(base=base, loss="minillm", fraction=1.0, gamma=1.0, clip_eps=0.2,
               updates_per_rollout=2)
    got, metrics, step = _run(mesh1, obj, batches[:1])
    assert step.jitted._cache_size() == 1 and int(metrics[0]["skipped"]) == 0

    tx = OPT.build(STEPS)
    state = create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(0)), tx, mesh=mesh1, seed=0)
    teacher = _teacher(mesh1)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    prep = jax.jit(lambda p: obj.prepare(p, batch, graphdef=state.graphdef, rest=state.rest,
                                         rng=state.rng, step=state.step, teacher=teacher)
                   )(state.params)

    def loss(p):
        w, _ = obj(p, prep, graphdef=state.graphdef, step=state.step, teacher=teacher,
                   rest=state.rest)
        return w.sum / w.count

    params, opt_state, losses = state.params, state.opt_state, []
    for _ in range(2):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        losses.append(float(value))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    _same_tree(got, jax.device_get(params), atol=5e-5)
    np.testing.assert_allclose(float(metrics[0]["loss"].mean()), losses[0], rtol=1e-5,
                               atol=1e-7)
    assert losses[1] != losses[0]  # the second update saw moved params (ratios ≠ 1)
