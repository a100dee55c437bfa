"""The generation engine behind `kdjax generate`: greedy equals transformers, sampled
frequencies follow the filtered softmax, per-row keys make a row's output independent of
its batch and of the device count, stop ids / EOS / pad == eos, log-probs, one compile
per bucket, stop strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from kdjax.models.sampler import TRACE_COUNTS, example_keys, generate, trace_count
from kdjax.models.sampling import filter_logits, trim_ids_at_stop_strings, truncate_at_stop_strings
from kdjax.sharding import make_mesh, shard_model
from tests.models.conftest import VOCAB
from tests.models.test_sampler import _torch_greedy

LENGTHS = [6, 3, 5, 4]
NEW = 6


def _prompts(rng, lengths=LENGTHS):
    prompts = rng.integers(3, VOCAB, (len(lengths), max(lengths))).astype(np.int32)
    for r, n in enumerate(lengths):
        prompts[r, n:] = 0
    return prompts


def _full_forward_logprobs(fam, prompt, completion):
    """log_softmax of kdjax's float32 logits over prompt + completion, at the positions
    that predict each completion token."""
    seq = np.concatenate([prompt, completion])[None]
    lsm = scipy.special.log_softmax(np.asarray(fam.forward(seq).logits[0], np.float64), -1)
    pos = np.arange(len(prompt) - 1, len(seq[0]) - 1)
    return lsm[pos, completion]


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_and_logprobs_match_a_full_forward(families, name, rng):
    fam = families(name)
    prompts = _prompts(rng)
    out = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                   eos_token_id=[])
    assert out.tokens.shape == (4, NEW) and out.logprobs.dtype == np.float32
    assert out.finish_reasons() == ["length"] * 4
    np.testing.assert_array_equal(out.lengths, NEW)
    for r, n in enumerate(LENGTHS):
        assert out.tokens[r].tolist() == _torch_greedy(fam, prompts[r, :n], new=NEW), r
        want = _full_forward_logprobs(fam, prompts[r, :n], out.tokens[r])
        np.testing.assert_allclose(out.logprobs[r], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.mean_logprobs(), out.logprobs.mean(axis=1), rtol=1e-6)


def test_sampled_logprobs_are_temperature_one(families, rng):
    """Log-probs are of the raw model (T = 1), not of the filtered sampling distribution."""
    fam = families("llama")
    prompts = _prompts(rng)
    out = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                   eos_token_id=[], temperature=1.7, top_k=9, top_p=0.8, seed=4)
    for r, n in enumerate(LENGTHS):
        want = _full_forward_logprobs(fam, prompts[r, :n], out.tokens[r])
        np.testing.assert_allclose(out.logprobs[r], want, rtol=1e-5, atol=1e-5)


# Pearson chi-square goodness of fit of the first sampled token over ROWS draws (one call,
# one prompt, a different key per row) against softmax(filter_logits(z, T, k, p)).
# Tokens with expected count < 5 are pooled into one cell. The test fails when the
# p-value is below ALPHA = 1e-4: the probability of a false failure (a correct sampler
# failing) is 1e-4 per case. Tokens the filter removes must never be drawn (exact).
ROWS, ALPHA = 4000, 1e-4


# The tiny model's logits are nearly flat (std ~0.6), so the temperature is set from their
# spread (z = logits / T has std 1 / scale). Power, checked by hand on another prompt with
# a reference temperature 10% off: p ~ 0.005-0.01 without top-p (missed at ALPHA), 1e-8 to
# 1e-26 with top-p; larger errors (a wrong filter, a wrong temperature by more) fail.
@pytest.mark.parametrize("scale,top_k,top_p", [(0.3, None, None), (0.3, 20, None),
                                              (0.3, None, 0.9), (0.3, 30, 0.95)])
def test_sampled_frequencies_follow_the_filtered_softmax(families, rng, scale, top_k, top_p):
    fam = families("llama")
    prompt = _prompts(rng, [5])
    logits = np.asarray(fam.forward(prompt).logits[0, -1], np.float32)[None]
    temperature = float(scale * logits.std())
    out = generate(fam.model, np.repeat(prompt, ROWS, axis=0), max_new_tokens=1,
                   eos_token_id=[], temperature=temperature, top_k=top_k, top_p=top_p,
                   seeds=np.arange(ROWS))
    z = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))[0]
    probs = np.exp(z.astype(np.float64) - z.max())
    probs /= probs.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=VOCAB)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    if top_k is not None:
        assert (probs > 0).sum() <= top_k
    expected = probs * ROWS
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    exp = exp[keep] * obs[keep].sum() / exp[keep].sum()  # scipy wants equal sums exactly
    assert keep.sum() >= 5, "too few cells for a meaningful test"
    stat, pvalue = scipy.stats.chisquare(obs[keep], exp)
    assert pvalue > ALPHA, (stat, pvalue, int(big.sum()))


def test_filter_matches_a_reference_with_a_full_sort(rng):
    """Top-p alone needs more than the candidate set here (V = 4096, near-flat logits):
    the full-sort fallback and the candidate path agree with a NumPy reference."""
    logits = rng.normal(size=(3, 4096)).astype(np.float32) * np.array([[0.1], [3.0], [30.]],
                                                                      np.float32)
    for top_k, top_p in [(None, 0.9), (300, 0.95), (None, 0.3)]:
        got = np.asarray(filter_logits(jnp.asarray(logits), 1.0, top_k, top_p))
        for row, g in zip(logits.astype(np.float64), got):
            order = np.argsort(-row, kind="stable")
            keep = np.zeros(row.shape, bool)
            keep[order[:top_k or len(row)]] = True
            p = np.where(keep, np.exp(row - row.max()), 0.0)[order]
            p /= p.sum()
            kept = order[((np.cumsum(p) - p) < top_p) & keep[order]]
            np.testing.assert_array_equal(np.flatnonzero(np.isfinite(g)), np.sort(kept))


def test_rows_do_not_depend_on_the_batch(families, rng):
    fam = families("llama")
    prompts = _prompts(rng)
    kw = dict(max_new_tokens=NEW, eos_token_id=[], temperature=1.0, top_p=0.9)
    ids = np.array([11, 12, 13, 14])
    full = generate(fam.model, prompts, prompt_lengths=LENGTHS, seeds=example_keys(0, ids),
                    n=2, **kw)
    order = [2, 0]  # a smaller batch, other order, other neighbours
    part = generate(fam.model, prompts[order], prompt_lengths=np.array(LENGTHS)[order],
                    seeds=example_keys(0, ids[order]), n=2, **kw)
    rows = np.array([[2 * i, 2 * i + 1] for i in order]).ravel()
    np.testing.assert_array_equal(part.tokens, full.tokens[rows])
    np.testing.assert_allclose(part.logprobs, full.logprobs[rows], rtol=1e-6, atol=1e-6)
    assert (full.tokens[0::2] != full.tokens[1::2]).any(), "samples of a prompt differ"
    # integer seeds are keys too: seeds=[s] is key(s) per prompt
    a = generate(fam.model, prompts[:2], prompt_lengths=LENGTHS[:2], seeds=[5, 6], **kw)
    b = generate(fam.model, prompts[1:2], prompt_lengths=LENGTHS[1:2], seeds=[6], **kw)
    np.testing.assert_array_equal(a.tokens[1:], b.tokens)


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2)])
def test_one_device_equals_eight(families, rng, mesh_shape):
    fam = families("qwen2")
    prompts = _prompts(rng)
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW, eos_token_id=[],
              temperature=0.9, top_k=40, seeds=example_keys(3, range(4)), n=3)
    one = generate(fam.model, prompts, **kw)
    assert len(jax.devices()) == 8
    mesh = make_mesh(**mesh_shape)
    sharded = shard_model(_copy(fam.model), mesh)
    eight = generate(sharded, prompts, mesh=mesh, **kw)  # 12 rows, padded to 16 on data=8
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)
    # an unsharded model is placed on the mesh by generate itself
    again = generate(_copy(fam.model), prompts, mesh=mesh, **kw)
    np.testing.assert_array_equal(again.tokens, one.tokens)


def _copy(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def test_stop_ids_eos_and_pad_equal_to_eos(families, rng):
    fam = families("llama")
    prompts = _prompts(rng)
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW)
    free = generate(fam.model, prompts, eos_token_id=[], **kw)
    eos, stop = int(free.tokens[0, 2]), int(free.tokens[1, 1])
    out = generate(fam.model, prompts, eos_token_id=eos, stop_token_ids=[stop, 7],
                   pad_token_id=eos, **kw)
    for r in range(4):
        row = free.tokens[r].tolist()
        ends = [t for t, tok in enumerate(row) if tok in (eos, stop, 7)]
        n = ends[0] + 1 if ends else NEW
        assert out.lengths[r] == n, r
        assert out.tokens[r, :n].tolist() == row[:n], r  # the stop token is kept
        assert (out.tokens[r, n:] == eos).all(), r  # pad == eos: later slots are padding
        assert (out.logprobs[r, n:] == 0).all() and (out.logprobs[r, :n] < 0).all()
        reason = "length" if not ends else "eos" if row[ends[0]] == eos else "stop"
        assert out.finish_reasons()[r] == reason, r
    assert out.finish_reasons()[0] in ("eos", "stop") and out.lengths[0] <= 3
    np.testing.assert_array_equal(out.sequences[:, :6], prompts)
    # eos given as a list of ids, the default eos from the config (2)
    listed = generate(fam.model, prompts, eos_token_id=[99, eos], **kw)
    for r in range(4):
        row = free.tokens[r].tolist()
        n = row.index(eos) + 1 if eos in row else NEW
        assert listed.lengths[r] == n
        assert listed.finish_reasons()[r] == ("eos" if eos in row else "length")
    default = generate(fam.model, prompts, **kw)
    assert fam.model.config.eos_token_id == 2
    for r in range(4):
        row = default.tokens[r].tolist()
        if 2 in row:
            assert default.lengths[r] == row.index(2) + 1
            assert default.finish_reasons()[r] == "eos"


def test_one_compile_per_bucket(families, rng):
    fam = families("llama")
    kw = dict(max_new_tokens=5, eos_token_id=[])
    before, traces = trace_count(), dict(TRACE_COUNTS)
    for lengths in ([6, 3, 5, 4], [2, 6, 6, 1], [6, 6, 6, 6]):  # bucket P = 6, B = 4
        generate(fam.model, _prompts(rng, lengths), prompt_lengths=lengths, **kw)
    assert trace_count() == before + 1
    assert TRACE_COUNTS[(4, 6, 5, "greedy")] == traces.get((4, 6, 5, "greedy"), 0) + 1
    generate(fam.model, _prompts(rng, [8, 2, 3, 8]), prompt_lengths=[8, 2, 3, 8], **kw)
    assert trace_count() == before + 2  # a new bucket, P = 8
    for seed in range(3):  # new sampling values (keys, T, k, p) are traced: no recompiles
        generate(fam.model, _prompts(rng), prompt_lengths=LENGTHS, temperature=0.5 + seed,
                 top_k=5 + seed, top_p=0.9, seeds=np.arange(4) + seed, **kw)
    assert trace_count() == before + 3


def test_bad_arguments_are_named(families):
    model = families("llama").model
    prompts = np.ones((2, 4), np.int32)
    for kw, match in [(dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(max_new_tokens=2, n=0), "n \\(completions"),
                      (dict(max_new_tokens=2, temperature=1.0, top_p=0.0), "top_p"),
                      (dict(max_new_tokens=2, temperature=1.0, top_p=1.5), "top_p"),
                      (dict(max_new_tokens=2, temperature=1.0, top_k=0), "top_k"),
                      (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
                      (dict(max_new_tokens=2, seeds=[1, 2, 3]), "seeds"),
                      (dict(max_new_tokens=2, stop_token_ids=[-3]), "stop_token_ids"),
                      (dict(max_new_tokens=2, prompt_lengths=[0, 4]), "prompt_lengths")]:
        with pytest.raises(ValueError, match=match):
            generate(model, prompts, **kw)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, np.ones((4,), np.int32), max_new_tokens=2)


def test_truncate_at_stop_strings():
    assert truncate_at_stop_strings("Hello\n\nUser: hi", ["User:", "\n\n"]) == ("Hello", True)
    assert truncate_at_stop_strings("no stop here", ["###"]) == ("no stop here", False)
    assert truncate_at_stop_strings("abc", ["", "c"]) == ("ab", True)
    assert truncate_at_stop_strings("abc", []) == ("abc", False)


def test_trim_ids_at_stop_strings():
    pieces = {1: "He", 2: "llo", 3: " wor", 4: "ld", 5: "!##", 6: "#", 7: " more"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    ids = [1, 2, 3, 4, 5, 6, 7]
    assert trim_ids_at_stop_strings(ids, ["###"], decode) == ([1, 2, 3, 4, 5, 6], True)
    assert trim_ids_at_stop_strings(ids, ["lo w"], decode) == ([1, 2, 3], True)
    assert trim_ids_at_stop_strings(ids, ["He"], decode) == ([1], True)
    assert trim_ids_at_stop_strings(ids, ["xyz"], decode) == (ids, False)
    assert trim_ids_at_stop_strings([], ["x"], decode) == ([], False)
    text, hit = truncate_at_stop_strings(decode([1, 2, 3, 4, 5, 6]), ["###"])
    assert (text, hit) == ("Hello world!", True)
