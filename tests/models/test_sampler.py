"""The KV-cache sampler: greedy equals transformers' greedy `generate`, EOS handling,
one compile per shape, the top-k / top-p filters against a NumPy reference, and the
CPU decode path (separate blocks, head-major caches) against the scanned stack."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kdjax.models import generate
from kdjax.models.sampler import _generate
from kdjax.models.sampling import filter_logits
from tests.models.conftest import VOCAB

LENGTHS = [6, 3, 5]
NEW = 8


def _prompts(rng):
    prompts = rng.integers(3, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    for r, n in enumerate(LENGTHS):
        prompts[r, n:] = 0  # right padding
    return prompts


def _torch_greedy(fam, prompt, eos=None, new=NEW):
    """transformers' greedy generate, stopping at `eos` only (its generation config's eos
    is switched off: `eos_token_id=None` alone would fall back to it)."""
    model = fam.torch_model.float()
    config = model.generation_config
    saved, config.eos_token_id = config.eos_token_id, eos
    try:
        with torch.no_grad():
            out = model.generate(torch.as_tensor(prompt[None]), max_new_tokens=new,
                                 do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
    finally:
        config.eos_token_id = saved
        fam.torch_model.double()
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_matches_transformers_and_compiles_once(families, name, rng):
    fam = families(name)
    prompts = _prompts(rng)
    before = _generate._cache_size()
    out = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                   eos_token_id=[])
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.lengths), NEW)
    for r, n in enumerate(LENGTHS):
        assert np.asarray(out.tokens[r]).tolist() == _torch_greedy(fam, prompts[r, :n]), r
    # new prompt values and lengths, same shapes: no new compilation
    generate(fam.model, _prompts(rng), prompt_lengths=[2, 6, 4], max_new_tokens=NEW,
             eos_token_id=[])
    assert _generate._cache_size() == before + 1


def test_eos_stops_rows_and_pads(families, rng):
    fam = families("llama")
    prompts = _prompts(rng)
    free = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                    eos_token_id=[])
    eos = int(free.tokens[0, 2])  # row 0 emits it at step 2
    before = _generate._cache_size()
    out = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                   eos_token_id=eos, pad_token_id=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r, n in enumerate(LENGTHS):
        expected = _torch_greedy(fam, prompts[r, :n], eos=eos)
        assert lengths[r] == len(expected), r
        assert tokens[r, :lengths[r]].tolist() == expected, r
        assert (tokens[r, lengths[r]:] == 0).all()
    assert lengths[0] == 3 and tokens[0, 2] == eos
    assert _generate._cache_size() == before, "eos ids are traced: no recompilation"
    np.testing.assert_array_equal(np.asarray(out.sequences[:, :6]), prompts)


def test_top_k_one_sampling_is_greedy(families, rng):
    fam = families("llama")
    prompts = _prompts(rng)
    greedy = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                      eos_token_id=[])
    sampled = generate(fam.model, prompts, prompt_lengths=LENGTHS, max_new_tokens=NEW,
                       eos_token_id=[], temperature=1.5, top_k=1, seed=3)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def _reference_filter(logits, temperature, top_k, top_p):
    out = logits / temperature
    for row in out:
        if top_k is not None:
            row[row < np.sort(row)[-top_k]] = -np.inf
        if top_p is not None:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            before = np.cumsum(p) - p
            row[order[before >= top_p]] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (7, 0.8), (None, 1e-9)])
def test_filter_logits_matches_reference(rng, top_k, top_p):
    logits = rng.normal(size=(4, 40)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.7, top_k, top_p))
    want = _reference_filter(logits.astype(np.float64), 0.7, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    if top_p == 1e-9:  # only the argmax survives
        assert (kept.sum(axis=1) == 1).all()


def test_sampling_follows_the_distribution(families, rng):
    """With temperature 1 and no filter, the first sampled token's frequencies over many
    seeds match softmax of the next-token logits (chi-square-style bound)."""
    fam = families("llama")
    prompt = np.repeat(_prompts(rng)[:1], 3, axis=0)  # 3 independent draws per call
    logits = fam.torch_logits(prompt[:1]).logits.numpy()[0, -1]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    draws = np.concatenate([
        np.asarray(generate(fam.model, prompt, max_new_tokens=NEW, temperature=1.0,
                            eos_token_id=[], seed=s).tokens[:, 0]) for s in range(60)])
    top = int(np.argmax(probs))
    freq = (draws == top).mean()
    assert abs(freq - probs[top]) < 4 * np.sqrt(probs[top] * (1 - probs[top]) / len(draws))


def test_bad_arguments_are_named(families):
    model = families("llama").model
    prompts = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, prompts, max_new_tokens=2, prompt_lengths=[0, 4])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, max_new_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompts, max_new_tokens=2, temperature=1.0, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompts, max_new_tokens=0)


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_unstacked_blocks_equal_the_scanned_stack(families, name, rng):
    """`Decoder(..., blocks=unstacked_blocks())` (the CPU decode path) gives the scanned
    stack's values: a plain forward (logits, hidden states, scores) and a cached step on
    per-layer head-major caches (logits, scores, every cache entry)."""
    import jax

    from kdjax.models.rollout import init_cache, unstack_cache

    model = families(name).model
    n = model.config.num_layers
    blocks = model.unstacked_blocks()
    tokens = jnp.asarray(rng.integers(3, VOCAB, (2, 7)), jnp.int32)
    kw = dict(hidden_layers=range(n + 1), attention_layers=range(n))
    want, got = model(tokens, **kw), model(tokens, blocks=blocks, **kw)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for a, b in ((got.hidden_states, want.hidden_states),
                 (got.attention_scores, want.attention_scores)):
        assert a.keys() == b.keys()
        for i in a:
            np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-5)
    # prefill 5 tokens, then one cached step of 2 tokens both ways
    cache = model(tokens[:, :5], cache=init_cache(model.config, 2, 9)).cache
    step = dict(segment_ids=jnp.ones((2, 2), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(5, 7), (2, 2)), attention_layers=(1,))
    want = model(tokens[:, 5:], cache=cache, **step)
    got = model(tokens[:, 5:], cache=unstack_cache(cache), blocks=blocks, **step)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.attention_scores[1], want.attention_scores[1], rtol=1e-5,
                               atol=1e-5)
    for i in range(n):
        for kind in ("k", "v"):
            np.testing.assert_allclose(
                got.cache["layers"][i][kind],
                jax.numpy.transpose(want.cache["layers"][kind][i], (0, 2, 1, 3)), atol=1e-6)
    assert int(got.cache["index"]) == 7
