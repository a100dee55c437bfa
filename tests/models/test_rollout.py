"""In-step rollouts: the same tokens as `generate` (greedy and sampled, same keys), rows
independent of the batch, teacher-mixed sampling (α = 0 is the student, α = 1 the
teacher, frequencies follow α·p + (1−α)·q), the three log-prob arrays against float64
full forwards of transformers' models, jit + grad composition, a sharded batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from flax import nnx

from kdjax.models import DecoderConfig, generate, init_decoder
from kdjax.models.rollout import rollout
from kdjax.sharding import logical_to_spec, make_mesh, shard_model
from tests.models.conftest import VOCAB
from tests.models.hlo import all_gathers
from tests.models.test_sampler import _reference_filter

LENGTHS = [6, 3, 5, 4]
P, C = max(LENGTHS), 6  # the shapes of test_generate.py: its generate compiles are reused
# one sampling set-up shared by most tests (one compile each)
T, TOP_K, TOP_P = 0.8, 20, 0.95
STUDENT, TEACHER = "llama", "llama_tied_mqa"  # same vocabulary, different models


def _prompts(rng, lengths=LENGTHS):
    prompts = rng.integers(3, VOCAB, (len(lengths), max(lengths))).astype(np.int32)
    for r, n in enumerate(lengths):
        prompts[r, n:] = 0
    return prompts


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def _generate_keys(keys):
    """The row keys `generate(seeds=keys)` samples with (n = 1: `fold_in(key, 0)`)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)


_FNS: dict = {}


def _runner(families, teacher: bool, mix: bool, **static):
    """`run(prompts, prompt_len, keys, alpha=None) -> RolloutOutput`: `rollout` jitted with
    the parameters as traced arguments (α traced too), compiled once per set-up."""
    key = (teacher, mix, tuple(sorted(static.items())))
    if key not in _FNS:
        g_s, s_state = nnx.split(families(STUDENT).model)
        g_t, t_state = nnx.split(families(TEACHER).model)

        @jax.jit
        def fn(s_state, t_state, prompts, prompt_len, keys, alpha):
            return rollout((g_s, s_state, None), prompts, prompt_len, keys,
                           teacher=(g_t, t_state, None) if teacher else None,
                           mix_alpha=alpha if mix else None, **static)

        _FNS[key] = functools.partial(fn, s_state, t_state)
    fn = _FNS[key]
    return lambda prompts, lengths, keys, alpha=0.0: fn(
        jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32), keys, jnp.float32(alpha))


def _torch_logprobs(fam, prompt, tokens, temperature=1.0):
    """`[len(tokens), V]` float64 log-softmax of transformers' float64 model over prompt +
    tokens at the positions that predict each token, logits divided by `temperature`."""
    seq = np.concatenate([prompt, tokens])[None]
    logits = fam.torch_logits(seq).logits.numpy()[0, len(prompt) - 1:len(seq[0]) - 1]
    return scipy.special.log_softmax(logits / temperature, axis=-1)


def _rows(out):
    return [np.asarray(x) for x in (out.tokens, out.lengths, out.logprobs)]


@pytest.mark.parametrize("greedy", [True, False])
def test_equals_generate_row_for_row(families, rng, greedy):
    prompts = _prompts(rng)
    fam = families(STUDENT)
    kw = dict(temperature=0.0) if greedy else dict(temperature=T, top_k=TOP_K, top_p=TOP_P)
    keys = _keys(1, 4)
    free = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=C,
                    eos_token_id=[], seeds=keys, **kw)
    row0 = np.asarray(free.tokens[0]).tolist()
    at = next(t for t in range(1, C) if row0[t] not in row0[:t])
    stop = row0[at]  # row 0 stops at step `at`, others maybe
    want = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=C,
                    eos_token_id=stop, pad_token_id=0, seeds=keys, **kw)
    run = _runner(families, teacher=False, mix=False, max_new_tokens=C, stop_ids=(stop,),
                  **kw)
    got = run(prompts, LENGTHS, _generate_keys(keys))
    for a, b in zip(_rows(got), _rows(want)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.finished, np.asarray(want.finish_reason) == 1)
    assert got.lengths[0] == at + 1 and got.finished[0] and (got.tokens[0, at + 1:] == 0).all()
    assert got.teacher_logprobs is None
    if greedy:  # a point mass
        np.testing.assert_array_equal(got.sample_logprobs, 0.0)
    else:  # the log-prob of the filtered, tempered student distribution at each token
        for r, n in enumerate(LENGTHS):
            k = int(got.lengths[r])
            lsm = _torch_logprobs(fam, prompts[r, :n], np.asarray(got.tokens[r, :k]))
            z = _reference_filter(lsm * 1.0, T, TOP_K, TOP_P)
            ref = scipy.special.log_softmax(z, axis=-1)[np.arange(k), got.tokens[r, :k]]
            np.testing.assert_allclose(got.sample_logprobs[r, :k], ref, rtol=1e-4, atol=1e-4)
            assert (got.sample_logprobs[r, k:] == 0).all()


def test_rows_do_not_depend_on_the_batch(families, rng):
    prompts, keys = _prompts(rng), _keys(2, 4)
    run = _runner(families, teacher=False, mix=False, max_new_tokens=C, temperature=T,
                  top_k=TOP_K, top_p=TOP_P, stop_ids=(2,))
    full = run(prompts, LENGTHS, keys)
    order = np.array([3, 1, 0, 2])
    permuted = run(prompts[order], np.array(LENGTHS)[order], keys[order])
    # rows 2 and 0 next to two other prompts (a batch of the same shape: no new compile)
    others = _prompts(rng, [2, 6])
    mixed = run(np.concatenate([prompts[[2, 0]], others]), [LENGTHS[2], LENGTHS[0], 2, 6],
                jnp.concatenate([keys[np.array([2, 0])], _keys(9, 2)]))
    for part, rows in ((permuted, order), (jax.tree.map(lambda x: x[:2], mixed), [2, 0])):
        np.testing.assert_array_equal(part.tokens, np.asarray(full.tokens)[rows])
        np.testing.assert_allclose(part.logprobs, np.asarray(full.logprobs)[rows], atol=1e-6)
        np.testing.assert_allclose(part.sample_logprobs, np.asarray(full.sample_logprobs)[rows],
                                   atol=1e-6)
    other = run(prompts, LENGTHS, _keys(3, 4))
    assert (np.asarray(other.tokens) != np.asarray(full.tokens)).any(), "keys matter"


def test_mixing_endpoints_are_the_student_and_the_teacher(families, rng):
    prompts, keys = _prompts(rng), _keys(4, 4)
    kw = dict(max_new_tokens=C, temperature=T, top_k=TOP_K, top_p=TOP_P, stop_ids=(2,))
    mixed = _runner(families, teacher=True, mix=True, **kw)
    student = _runner(families, teacher=False, mix=False, **kw)(prompts, LENGTHS, keys)
    at0 = mixed(prompts, LENGTHS, keys, 0.0)
    np.testing.assert_array_equal(at0.tokens, student.tokens)
    np.testing.assert_allclose(at0.sample_logprobs, student.sample_logprobs, atol=1e-5)
    np.testing.assert_allclose(at0.logprobs, student.logprobs, atol=1e-6)
    at1 = mixed(prompts, LENGTHS, _generate_keys(keys), 1.0)
    teacher = generate(families(TEACHER).model, prompts, prompt_lengths=LENGTHS,
                       max_new_tokens=C, eos_token_id=2, seeds=keys, temperature=T,
                       top_k=TOP_K, top_p=TOP_P)
    np.testing.assert_array_equal(at1.tokens, teacher.tokens)
    np.testing.assert_array_equal(at1.lengths, teacher.lengths)
    np.testing.assert_allclose(at1.teacher_logprobs, teacher.logprobs, atol=1e-5)
    assert (np.asarray(at0.tokens) != np.asarray(at1.tokens)).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (T, TOP_K, TOP_P)])
def test_logprobs_match_float64_full_forwards(families, rng, temperature, top_k, top_p):
    """Student, teacher and sampling log-probs of a mixed rollout (α = 0.3) against
    transformers' float64 models run on the produced sequences; at temperature 1 without
    filters, `sample_logprobs` is exactly log(α·p + (1−α)·q), so
    `exp(logprobs - sample_logprobs)` is MiniLLM's importance weight."""
    alpha, prompts = 0.3, _prompts(rng)
    run = _runner(families, teacher=True, mix=True, max_new_tokens=C,
                  temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(2,))
    out = run(prompts, LENGTHS, _keys(5, 4), alpha)
    for r, n in enumerate(LENGTHS):
        k = int(out.lengths[r])
        toks = np.asarray(out.tokens[r, :k])
        at = np.arange(k)
        q1 = _torch_logprobs(families(STUDENT), prompts[r, :n], toks)
        p1 = _torch_logprobs(families(TEACHER), prompts[r, :n], toks)
        np.testing.assert_allclose(out.logprobs[r, :k], q1[at, toks], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.teacher_logprobs[r, :k], p1[at, toks], rtol=1e-4,
                                   atol=1e-4)
        log_m = np.logaddexp(np.log(alpha) + scipy.special.log_softmax(p1 / temperature, -1),
                             np.log1p(-alpha) + scipy.special.log_softmax(q1 / temperature, -1))
        ref = scipy.special.log_softmax(_reference_filter(log_m, 1.0, top_k, top_p), -1)
        np.testing.assert_allclose(out.sample_logprobs[r, :k], ref[at, toks], rtol=1e-4,
                                   atol=1e-4)
        if temperature == 1.0 and top_k is None:
            weight = np.exp(out.logprobs[r, :k] - out.sample_logprobs[r, :k])
            q, p = np.exp(q1[at, toks]), np.exp(p1[at, toks])
            np.testing.assert_allclose(weight, q / (alpha * p + (1 - alpha) * q), rtol=1e-4)
        for arr in (out.logprobs, out.teacher_logprobs, out.sample_logprobs):
            assert (np.asarray(arr[r, k:]) == 0).all()
        assert out.finished[r] == (2 in toks.tolist())


# Pearson chi-square of the first token over ROWS rows (one prompt, a key per row) against
# m = α·p_T + (1−α)·q_T from float64 forwards; cells with expected count < 5 pooled. A
# correct sampler fails with probability ALPHA. The same counts must reject q_T alone and
# p_T alone (the test has power against "ignored the teacher" and "ignored the student").
ROWS, ALPHA, MIX = 4000, 1e-4, 0.4


def _chi_square_pvalue(counts, probs):
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert keep.sum() >= 5, "too few cells for a meaningful test"
    exp = exp[keep] * obs[keep].sum() / exp[keep].sum()
    return scipy.stats.chisquare(obs[keep], exp).pvalue


def test_mixed_first_tokens_follow_the_mixture(families, rng):
    prompt = _prompts(rng, [5])
    q_logits = families(STUDENT).torch_logits(prompt).logits.numpy()[0, -1]
    p_logits = families(TEACHER).torch_logits(prompt).logits.numpy()[0, -1]
    temperature = 0.25  # sharpens the tiny models' near-flat logits (std ~1)
    run = _runner(families, teacher=True, mix=True, max_new_tokens=1, temperature=temperature)
    out = run(np.repeat(prompt, ROWS, 0), [5] * ROWS, _keys(6, ROWS), MIX)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
    q = scipy.special.softmax(q_logits / temperature)
    p = scipy.special.softmax(p_logits / temperature)
    assert _chi_square_pvalue(counts, MIX * p + (1 - MIX) * q) > ALPHA
    assert _chi_square_pvalue(counts, q) < ALPHA and _chi_square_pvalue(counts, p) < ALPHA


def test_jit_and_grad_through_a_loss_on_rollouts(families, rng):
    """A loss that samples with `rollout` (params under stop_gradient, by the caller or
    not) then scores the samples differentiably: jax.grad works and equals the gradient of
    the same loss on the sampled tokens held fixed."""
    graphdef, state = nnx.split(families(STUDENT).model)
    prompts, keys = _prompts(rng, [P] * 4), _keys(7, 4)

    def sequence_logprob(state, tokens, lengths):
        seq = jnp.concatenate([prompts, tokens], axis=1)
        logits = nnx.merge(graphdef, state)(seq).logits.astype(jnp.float32)
        lsm = jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1)
        lp = jnp.take_along_axis(lsm, tokens[..., None], axis=-1)[..., 0]
        return jnp.where(jnp.arange(C)[None] < lengths[:, None], lp, 0.0)

    def sample(state):
        return rollout((graphdef, state, None), prompts, jnp.full((4,), P, jnp.int32), keys,
                       max_new_tokens=C, temperature=1.0, stop_ids=(2,))

    def loss(state, caller_stops=True):
        out = sample(jax.lax.stop_gradient(state) if caller_stops else state)
        return -sequence_logprob(state, out.tokens, out.lengths).sum(), out

    (value, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    fixed = jax.jit(jax.grad(lambda s: -sequence_logprob(s, out.tokens, out.lengths).sum()))(
        state)
    np.testing.assert_allclose(value, -out.logprobs.sum(), rtol=1e-5)
    assert (np.asarray(out.lengths) > 1).all()
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(fixed))
    assert scale > 0
    for g, f in zip(jax.tree.leaves(grad), jax.tree.leaves(fixed)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, f, rtol=1e-4, atol=1e-5 * scale)
    # the caller's stop_gradient is not needed (rollout stops it itself): tracing the
    # gradient is enough to show no tangent reaches the while_loop
    jax.eval_shape(jax.grad(lambda s: loss(s, caller_stops=False)[0]), state)


def test_sharded_batch_equals_one_device_and_gathers_no_rows(families, rng):
    """12 rows split over data × fsdp = 4 (tensor 2 splits heads and vocab), inside one jit
    with sharded parameters: the same samples as one device (in batches of 4), outputs
    stay row-sharded, and no all-gather result carries the global batch (12), the cache
    length (12 slots) or the completion axis (6): only weights and per-device rows
    move."""
    from tests.models.test_generate import _copy

    rows, lengths = 12, np.array(LENGTHS * 3)
    prompts, keys = _prompts(rng, lengths), _keys(8, rows)
    kw = dict(max_new_tokens=C, temperature=T, top_k=TOP_K, top_p=TOP_P, stop_ids=(2,))
    run = _runner(families, teacher=True, mix=True, **kw)
    parts = [run(prompts[i:i + 4], lengths[i:i + 4], keys[i:i + 4], 0.5) for i in (0, 4, 8)]
    one = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    g_s, s_state = nnx.split(shard_model(_copy(families(STUDENT).model), mesh))
    g_t, t_state = nnx.split(shard_model(_copy(families(TEACHER).model), mesh))
    spec = logical_to_spec(("batch",), mesh=mesh)
    put = lambda x, *rest: jax.device_put(  # noqa: E731
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec, *rest)))

    def fn(s_state, t_state, prompts, prompt_len, keys):
        return rollout((g_s, s_state, None), prompts, prompt_len, keys,
                       teacher=(g_t, t_state, None), mix_alpha=0.5, **kw)

    args = (s_state, t_state, put(jnp.asarray(prompts), None),
            put(jnp.asarray(lengths, jnp.int32)), put(keys))
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
        out = compiled(*args)
    np.testing.assert_array_equal(out.tokens, one.tokens)
    for a, b in ((out.logprobs, one.logprobs), (out.teacher_logprobs, one.teacher_logprobs),
                 (out.sample_logprobs, one.sample_logprobs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert out.tokens.sharding.spec[0] == spec[0]
    # no weight dimension of the two models is 12 or 6 (nor a shard of one)
    moved = [g for g in all_gathers(compiled.as_text())
             if any(d in (rows, P + C, C) for d in g[1])]
    assert moved == []


def test_bad_arguments_are_named(families):
    model, teacher = families(STUDENT).model, families(TEACHER).model
    prompts, lengths, keys = jnp.ones((2, 4), jnp.int32), jnp.full((2,), 4), _keys(0, 2)
    other_vocab = init_decoder(DecoderConfig(vocab_size=VOCAB + 8, hidden_size=16,
                                             intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1))
    cases = [(dict(mix_alpha=0.5), "needs a teacher"),
             (dict(teacher=teacher, mix_alpha=0.5, temperature=0.0), "temperature > 0"),
             (dict(teacher=teacher, mix_alpha=1.5), "mix_alpha must be in"),
             (dict(teacher=other_vocab), "vocabulary"),
             (dict(max_new_tokens=0), "max_new_tokens"),
             (dict(temperature=-1.0), "temperature"),
             (dict(top_p=0.0), "top_p"),
             (dict(top_k=VOCAB + 1), "top_k"),
             (dict(stop_ids=(-1,)), "stop_ids"),
             (dict(keys=_keys(0, 3)), "keys must be"),
             (dict(prompt_len=jnp.full((3,), 4)), "prompt_len"),
             (dict(prompts=jnp.ones((4,), jnp.int32)), "prompts"),
             (dict(student="model"), "Decoder")]
    for kw, match in cases:
        args = dict(student=model, prompts=prompts, prompt_len=lengths, keys=keys,
                    max_new_tokens=2, temperature=1.0) | kw
        with pytest.raises(ValueError, match=match):
            rollout(**args)
