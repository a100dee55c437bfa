"""kdjax decoders vs transformers' torch models (float64 reference) for every family:
logits on unpacked and packed rows, requested hidden states and attention scores, and
the export round trip. All forwards share one compiled [3, 12] function per family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kdjax.models import positions_from_segments, save_pretrained
from tests.models.conftest import CASES, VOCAB, numpy_positions
from tests.tolerances import assert_close

PARITY = dict(rtol=0, atol=1e-4)  # the bar: |kdjax f32 - torch| <= 1e-4
SHAPE = (3, 12)
SEGMENTS = [[5, 4, 0], [7, 5, 0], [3, 3, 6]]  # lengths per row; rows 0, 1 end in padding


def _tokens(rng, shape=SHAPE):
    return rng.integers(3, VOCAB, shape).astype(np.int32)


def _packed_segment_ids():
    segment_ids = np.zeros(SHAPE, np.int32)
    for r, segs in enumerate(SEGMENTS):
        start = 0
        for s, n in enumerate(segs):
            segment_ids[r, start:start + n] = s + 1
            start += n
    return segment_ids


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_torch(families, name, rng):
    fam = families(name)
    tokens = _tokens(rng)
    expected = fam.torch_logits(tokens).logits.numpy()
    out = fam.forward(tokens)
    assert out.logits.shape == (*SHAPE, VOCAB) and out.logits.dtype == jnp.float32
    assert_close(out.logits, expected, **PARITY)
    # the final hidden state and lm_head give the same logits (the fused-loss path)
    assert_close(out.hidden @ fam.model.lm_head(), expected, **PARITY)


@pytest.mark.parametrize("name", list(CASES))
def test_packed_rows_match_each_segment_alone(families, name, rng):
    fam = families(name)
    tokens = _tokens(rng)
    segment_ids = _packed_segment_ids()
    tokens[segment_ids == 0] = 0
    logits = np.asarray(fam.forward(tokens, segment_ids).logits)
    assert np.isfinite(logits).all(), "padding rows must stay finite"
    for r, segs in enumerate(SEGMENTS):
        start = 0
        for n in segs:
            if n:
                alone = fam.torch_logits(tokens[r:r + 1, start:start + n]).logits.numpy()[0]
                assert_close(logits[r, start:start + n], alone, **PARITY)
            start += n


def test_positions_from_segments_matches_reference():
    segment_ids = _packed_segment_ids()
    np.testing.assert_array_equal(
        np.asarray(positions_from_segments(jnp.asarray(segment_ids))),
        numpy_positions(segment_ids))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_positions_are_used(families, name, rng):
    fam = families(name)
    tokens, segment_ids = _tokens(rng), _packed_segment_ids()
    positions = numpy_positions(segment_ids)
    base = np.asarray(fam.forward(tokens, segment_ids, positions).logits)
    # RoPE is relative, so a constant shift changes nothing; stretching changes phases
    shifted = np.asarray(fam.forward(tokens, segment_ids, positions + 5).logits)
    assert_close(shifted, base, rtol=0, atol=1e-5)
    stretched = np.asarray(fam.forward(tokens, segment_ids, positions * 2).logits)
    assert np.abs(stretched - base).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3"])
def test_hidden_states_and_attention_match_torch(families, name, rng):
    fam = families(name)
    tokens = _tokens(rng)
    ref = fam.torch_logits(tokens, output_hidden_states=True, output_attentions=True)
    out = fam.forward(tokens)
    assert sorted(out.hidden_states) == [0, 1, 2]
    for i in (0, 1, 2):
        assert_close(out.hidden_states[i], ref.hidden_states[i].numpy(), **PARITY)
    assert_close(out.hidden, ref.hidden_states[-1].numpy(), **PARITY)
    for i in (0, 1):
        assert out.attention_scores[i].shape == (3, 4, 12, 12)
        probs = jax.nn.softmax(out.attention_scores[i], axis=-1)
        assert_close(probs, ref.attentions[i].numpy(), **PARITY)


@pytest.mark.parametrize("name", list(CASES))
def test_export_round_trip(families, name, rng, tmp_path):
    fam = families(name)
    save_pretrained(fam.model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(fam.torch_model)
    original = fam.torch_model.config.to_dict()
    for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_parameters",
                "sliding_window", "attention_bias", "vocab_size"):
        if key in original:
            assert reloaded.config.to_dict()[key] == original[key], key
    reloaded = reloaded.double()
    want = {k: v for k, v in fam.torch_model.state_dict().items() if "inv_freq" not in k}
    got = {k: v for k, v in reloaded.state_dict().items() if "inv_freq" not in k}
    assert sorted(got) == sorted(want)
    for key, value in want.items():  # f32 weights survive the round trip bit for bit
        assert torch.equal(got[key], value), key
    tokens = _tokens(rng)
    with torch.no_grad():
        logits = reloaded(torch.as_tensor(tokens)).logits.numpy()
    assert_close(logits, fam.torch_logits(tokens).logits.numpy(), rtol=0, atol=1e-6)
