"""completion_layout: the one place where prompt ‖ completion is laid out and shifted."""

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.train.layout import completion_layout, completion_mask, to_completion


def _reference(prompt, plen, completion, clen, pad):
    n, p = prompt.shape
    c = completion.shape[1]
    out = {k: np.zeros((n, p + c), np.int64) for k in ("tokens", "targets", "positions",
                                                       "segment_ids")}
    out["loss_mask"] = np.zeros((n, p + c), bool)
    for r in range(n):
        seq = list(prompt[r, :plen[r]]) + list(completion[r, :clen[r]])
        row = seq + [pad] * (p + c - len(seq))
        out["tokens"][r] = row
        out["targets"][r] = row[1:] + [pad]
        out["segment_ids"][r, :len(seq)] = 1
        out["positions"][r, :len(seq)] = np.arange(len(seq))
        for j in range(clen[r]):  # slot p-1+j predicts completion token j
            out["loss_mask"][r, plen[r] - 1 + j] = True
            assert out["targets"][r, plen[r] - 1 + j] == completion[r, j]
    return out


@pytest.mark.parametrize("pad", [0, 7])  # 7 = the eos id below: pad == eos
def test_layout_matches_reference(pad):
    rng = np.random.default_rng(0)
    n, p, c = 6, 5, 4
    prompt = rng.integers(1, 50, (n, p))
    completion = rng.integers(1, 50, (n, c))
    plen = np.array([1, 5, 3, 2, 5, 4])
    clen = np.array([0, 4, 2, 1, 3, 4])
    completion[np.arange(n), np.maximum(clen - 1, 0)] = 7  # each completion ends in eos
    prompt[:, 4:] = rng.integers(1, 50, (n, 1))  # garbage past prompt_len must not leak
    got = completion_layout(jnp.asarray(prompt), jnp.asarray(plen), jnp.asarray(completion),
                            jnp.asarray(clen), pad)
    want = _reference(prompt, plen, completion, clen, pad)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
    # the eos token is a target even when it equals the pad id
    assert got["loss_mask"].sum() == clen.sum()


def test_to_completion_round_trip():
    rng = np.random.default_rng(1)
    n, p, c = 4, 6, 3
    plen = np.array([1, 6, 3, 4])
    clen = np.array([3, 0, 2, 3])
    values = rng.standard_normal((n, p + c, 2)).astype(np.float32)
    got = np.asarray(to_completion(jnp.asarray(values), jnp.asarray(plen), c))
    mask = np.asarray(completion_mask(jnp.asarray(clen), c))
    for r in range(n):
        for j in range(c):
            if mask[r, j]:
                np.testing.assert_array_equal(got[r, j], values[r, plen[r] - 1 + j])
    assert mask.sum() == clen.sum()
