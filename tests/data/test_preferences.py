"""Preference stores: selection rules and their counts, the stored arrays, the Loader
serving them unchanged, stored reference log-probs, and clear errors."""

import jax
import numpy as np
import pytest

from kdjax.data import Loader
from kdjax.data.preferences import (
    PreferenceStore,
    build_preference_store,
    open_preference_store,
    with_reference_logps,
)
from kdjax.sharding import make_mesh
from kdjax.storage import RowStoreWriter, StoreMismatchError

V, P, C, K = 50, 4, 3, 3
FP = "tokenizer-fingerprint"


def _ids(rng, n):
    return rng.integers(3, V, n).tolist()


def _build(path, prompts, cands, scores, **kw):
    kw = {"tokenizer": FP, "vocab_size": V, "prompt_len": P, "completion_len": C,
          "num_candidates": K, **kw}
    return build_preference_store(path, prompts, cands, scores, **kw)


def test_selection_rules_counts_and_arrays(tmp_path, rng):
    p_ok, p_long = _ids(rng, 3), _ids(rng, 6)
    c = [_ids(rng, n) for n in (1, 2, 3, 5)]
    examples = [  # (prompt, candidates, scores), what happens
        (p_ok, [c[0], c[1], c[2]], [0.5, -1.0, 2.0]),           # kept as is
        ([], [c[0], c[1]], [1.0, 0.0]),                          # empty prompt: dropped
        (p_long, [c[2], [], c[1]], [1.0, 3.0, 0.0]),             # left-truncated, empty cand
        (p_ok, [c[3], c[1]], [1.0, 0.0]),                        # long cand dropped: 1 left
        (p_ok, [c[0], c[1], c[2]], [1.0, 1.0, 1.0]),             # all tied: skipped
        (p_ok, [c[0], c[1], c[2], c[0]], [0.0, 4.0, 4.0, 5.0]),  # 4 > K: worst one dropped
    ]
    out = _build(tmp_path / "s", *map(list, zip(*examples)), pad_id=1,
                 example_ids=[10, 11, 12, 13, 14, 15])
    assert out["rows"] == 3
    assert {k: out[k] for k in ("num_examples", "dropped_empty_prompts", "truncated_prompts",
                                "dropped_empty_candidates", "dropped_long_candidates",
                                "dropped_extra_candidates", "skipped_few_candidates",
                                "skipped_tied_scores", "dropped_long_prompts",
                                "truncated_candidates")} == {
        "num_examples": 6, "dropped_empty_prompts": 1, "truncated_prompts": 1,
        "dropped_empty_candidates": 1, "dropped_long_candidates": 1,
        "dropped_extra_candidates": 1, "skipped_few_candidates": 1,
        "skipped_tied_scores": 1, "dropped_long_prompts": 0, "truncated_candidates": 0}

    store = open_preference_store(out["path"])
    assert (store.num_rows, store.num_candidates, store.prompt_len) == (3, K, P)
    assert store.tokenizer_fingerprint == FP and not store.has_ref_logps
    rows = store.read(np.arange(3))
    assert {k: v.dtype.name for k, v in rows.items()} == {
        "prompt": "int32", "prompt_len": "int32", "candidates": "int32",
        "candidate_len": "int32", "scores": "float32", "valid": "bool", "example_id": "int32"}
    np.testing.assert_array_equal(rows["example_id"], [10, 12, 15])
    np.testing.assert_array_equal(rows["prompt_len"], [3, 4, 3])
    np.testing.assert_array_equal(rows["prompt"][1], p_long[-P:])  # the last P ids
    np.testing.assert_array_equal(rows["prompt"][0], p_ok + [1])  # right-padded with pad_id
    np.testing.assert_array_equal(rows["valid"], [[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(rows["scores"][1], [1.0, 0.0, 0.0])  # valid first
    np.testing.assert_array_equal(rows["candidate_len"][0], [1, 2, 3])
    np.testing.assert_array_equal(rows["candidates"][0, 1], c[1] + [1])
    # the K best of row 15 in input order: scores 4, 4, 5 (the 0 dropped)
    np.testing.assert_array_equal(rows["scores"][2], [4.0, 4.0, 5.0])
    np.testing.assert_array_equal(rows["candidates"][1, 0], c[2])
    # rebuilding the same data gives the same fingerprint (and resumes the finished store)
    again = _build(tmp_path / "s", *map(list, zip(*examples)), pad_id=1,
                   example_ids=[10, 11, 12, 13, 14, 15])
    assert again["fingerprint"] == out["fingerprint"]


def test_truncation_policies_and_reference_forbids_truncation(tmp_path, rng):
    prompt, long_cand, short = _ids(rng, 6), _ids(rng, 5), _ids(rng, 2)
    args = ([prompt], [[long_cand, short]], [[1.0, 0.0]])
    out = _build(tmp_path / "a", *args, truncate="left", candidate_truncate="right")
    rows = open_preference_store(out["path"]).read(np.arange(1))
    np.testing.assert_array_equal(rows["candidates"][0, 0], long_cand[:C])
    assert out["truncated_candidates"] == 1 and out["truncated_prompts"] == 1
    with pytest.raises(ValueError, match="no example is left"):
        _build(tmp_path / "b", *args, truncate="drop")
    # stored log-probs belong to the whole sequence: truncation drops instead
    with pytest.raises(ValueError, match="'dropped_long_prompts': 1"):
        _build(tmp_path / "c", *args, candidate_truncate="right", ref_logps=[[-3.0, -2.0]],
               reference_fingerprint="ref")


def test_loader_serves_rows_unchanged(tmp_path, rng):
    n = 6
    prompts = [_ids(rng, rng.integers(1, P + 1)) for _ in range(n)]
    cands = [[_ids(rng, rng.integers(1, C + 1)) for _ in range(K)] for _ in range(n)]
    scores = rng.normal(size=(n, K)).tolist()
    refs = (-rng.random((n, K)) * 10).tolist()
    store = open_preference_store(_build(tmp_path / "s", prompts, cands, scores, ref_logps=refs,
                                         reference_fingerprint="ref-A")["path"])
    store.check_reference("ref-A")
    loader = Loader(store, global_batch_size=2, seed=3,
                    mesh=make_mesh(data=2, devices=jax.devices()[:2]))
    batch = loader.batch_at(1)
    want = store.read(loader.rows_at(1))
    assert set(batch) == set(want)
    for k, v in batch.items():
        assert v.dtype == want[k].dtype, k
        np.testing.assert_array_equal(np.asarray(v), want[k])
    np.testing.assert_allclose(want["ref_logps"], np.asarray(refs, np.float32)[loader.rows_at(1)])


def test_with_reference_logps_round_trip(tmp_path, rng):
    prompts = [_ids(rng, 2), _ids(rng, 3)]
    cands = [[_ids(rng, 2), _ids(rng, 1)], [_ids(rng, 3), _ids(rng, 2), _ids(rng, 1)]]
    store = open_preference_store(_build(tmp_path / "s", prompts, cands,
                                         [[1.0, 0.0], [0.0, 2.0, 1.0]])["path"])
    with pytest.raises(StoreMismatchError, match="holds no reference log-probs"):
        store.check_reference("ref")
    ref = -rng.random((2, K)).astype(np.float32) * 5
    ref[0, 2] = np.nan  # a padding slot: stored as 0, not an error
    out = open_preference_store(with_reference_logps(store, ref, tmp_path / "r",
                                                     reference_fingerprint="ref-B")["path"])
    rows = out.read(np.arange(2))
    np.testing.assert_array_equal(rows["ref_logps"], np.where(rows["valid"], ref, 0.0))
    np.testing.assert_array_equal(rows["candidates"], store.read(np.arange(2))["candidates"])
    assert out.counts == store.counts and out.reference_fingerprint == "ref-B"
    with pytest.raises(StoreMismatchError, match="not of 'ref-C'"):
        out.check_reference("ref-C")
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        with_reference_logps(store, ref[:, :2], tmp_path / "x", reference_fingerprint="r")
    ref[1, 0] = -np.inf
    with pytest.raises(ValueError, match="ref_logps\\[1, 0\\] = -inf is not finite"):
        with_reference_logps(store, ref, tmp_path / "y", reference_fingerprint="r")


def test_bad_input_errors(tmp_path, rng):
    p, c = _ids(rng, 2), [_ids(rng, 2), _ids(rng, 2)]
    cases = [
        (([p], [c], [[1.0, np.nan]]), {}, "example 0: scores must be finite"),
        (([p], [[c[0], [V + 1]]], [[1.0, 0.0]]), {}, "example 0: candidate 1 .*outside the "
                                                    "vocabulary"),
        (([p], [c], [[1.0]]), {}, "example 0: 2 candidates but 1 scores"),
        (([p, p], [c], [[1.0, 0.0]]), {}, "one entry per example"),
        (([p], [c], [[1.0, 0.0]]), {"ref_logps": [[-1.0, -2.0]]}, "reference_fingerprint"),
        (([p], [c], [[1.0, 0.0]]), {"num_candidates": 1}, "num_candidates must be >= 2"),
        (([p], [c], [[1.0, 1.0]]), {}, "'skipped_tied_scores': 1"),
        (([p], [c], [[1.0, 0.0]]), {"truncate": "right"}, "truncate must be one of"),
        (([p], [c], [[1.0, 0.0]]), {"example_ids": [2**31]}, "stored as int32"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _build(tmp_path / "bad", *args, **kw)
    with pytest.raises(ValueError, match="vocab_size is needed"):
        build_preference_store(tmp_path / "bad", [p], [c], [[1.0, 0.0]], tokenizer=FP,
                               prompt_len=P, completion_len=C)
    other = tmp_path / "other"
    with RowStoreWriter(other, arrays={"x": ((1,), np.int32)}, num_rows=1, shard_rows=1,
                        metadata={"kind": "kdjax.token_store"}) as w:
        w.write_shard(0, {"x": np.zeros((1, 1), np.int32)})
        w.finalize()
    with pytest.raises(StoreMismatchError, match="is not a preference store"):
        PreferenceStore(other)
    store = open_preference_store(_build(tmp_path / "ok", [p], [c], [[1.0, 0.0]])["path"])
    with pytest.raises(StoreMismatchError, match="another tokenizer"):
        store.check_tokenizer("another-fingerprint")
    store.check_tokenizer(FP)
