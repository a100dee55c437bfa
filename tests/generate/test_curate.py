"""Curation filters on hand-made records: each filter drops exactly what it should and
counts it; filters apply in order on what the previous ones kept."""

import re

import pytest

from kdjax.generate.curate import (
    FilterConfig,
    curate,
    curate_shards,
    extract_answer,
    jaccard,
    majority_answers,
    ngrams,
)
from kdjax.schema import ConfigError


def rec(example_id, sample_index, completion, *, finish="eos", n_tokens=None, lp=-1.0,
        prompt="p"):
    n = len(completion.split()) if n_tokens is None else n_tokens
    return {"example_id": example_id, "sample_index": sample_index, "prompt": prompt,
            "completion": completion, "completion_ids": list(range(n)),
            "finish_reason": finish, "mean_logprob": lp}


OFF = dict(dedup=False, near_duplicate=None, finished_only=False, min_tokens=0)


def test_finished_only_drops_length_cut_samples():
    rs = [rec(0, 0, "a b", finish="eos"), rec(0, 1, "a c", finish="length"),
          rec(1, 0, "x", finish="stop")]
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "finished_only": True}))
    assert [(r["example_id"], r["sample_index"]) for r in kept] == [(0, 0), (1, 0)]
    assert dropped["finished"] == 1 and sum(dropped.values()) == 1


def test_length_bounds_are_inclusive():
    rs = [rec(i, 0, "w", n_tokens=n) for i, n in enumerate([0, 1, 5, 6, 9])]
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "min_tokens": 1, "max_tokens": 6}))
    assert [len(r["completion_ids"]) for r in kept] == [1, 5, 6]
    assert dropped["length"] == 2


def test_min_mean_logprob():
    rs = [rec(0, i, f"s{i}", lp=lp) for i, lp in enumerate([-0.5, -2.0, -1.0, -1.01])]
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "min_mean_logprob": -1.0}))
    assert [r["mean_logprob"] for r in kept] == [-0.5, -1.0]
    assert dropped["mean_logprob"] == 2


def test_exact_duplicates_ignore_case_and_spaces_but_not_the_prompt():
    rs = [rec(0, 0, "The  answer is 4"), rec(0, 1, "the answer is 4 "),
          rec(1, 0, "the answer is 4", prompt="other"), rec(0, 2, "the answer is 5")]
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "dedup": True}))
    assert [(r["example_id"], r["sample_index"]) for r in kept] == [(0, 0), (1, 0), (0, 2)]
    assert dropped["exact_duplicate"] == 1


def test_near_duplicates_within_an_example_only():
    base = "one two three four five six seven eight nine ten"
    near = "one two three four five six seven eight nine eleven"  # 7 of 9 trigrams shared
    rs = [rec(0, 0, base), rec(0, 1, near), rec(1, 0, near), rec(0, 2, "a b c d e")]
    j = jaccard(ngrams(base, 3), ngrams(near, 3))
    assert j == pytest.approx(7 / 9)
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "near_duplicate": 0.75, "ngram": 3}))
    assert [(r["example_id"], r["sample_index"]) for r in kept] == [(0, 0), (1, 0), (0, 2)]
    assert dropped["near_duplicate"] == 1
    kept, _ = curate(rs, FilterConfig(**{**OFF, "near_duplicate": 0.8, "ngram": 3}))
    assert len(kept) == 4  # 7/9 < 0.8: kept


def test_self_consistency_keeps_the_majority_answer():
    pat = r"answer is (-?\d+)"
    rs = [rec(0, 0, "so the answer is 4"), rec(0, 1, "answer is 5"),
          rec(0, 2, "hmm the answer is 3, no, the answer is 4"),  # the last match counts
          rec(0, 3, "no idea"),
          rec(1, 0, "answer is 7"), rec(1, 1, "answer is 8")]  # a tie: first seen wins
    kept, dropped = curate(rs, FilterConfig(**{**OFF, "answer_regex": pat}))
    assert [(r["example_id"], r["sample_index"], r["answer"]) for r in kept] == [
        (0, 0, "4"), (0, 2, "4"), (1, 0, "7")]
    assert dropped["self_consistency"] == 3


def test_filters_apply_in_order_and_count_on_what_reaches_them():
    rs = [rec(0, 0, "answer is 1", finish="length"), rec(0, 1, "answer is 2"),
          rec(0, 2, "answer is 2"), rec(0, 3, "answer is 3")]
    kept, dropped = curate(rs, FilterConfig(answer_regex=r"answer is (\d)", min_tokens=0,
                                            near_duplicate=None))
    # length-cut dropped first; then the exact duplicate; then 2 vs 3 tie → 2 (first)
    assert [r["sample_index"] for r in kept] == [1]
    assert dropped == {"finished": 1, "length": 0, "mean_logprob": 0, "exact_duplicate": 1,
                       "near_duplicate": 0, "self_consistency": 1}


def test_extract_answer_without_groups_and_majority_helper():
    assert extract_answer("x 12 y 34", re.compile(r"\d+")) == "34"
    assert extract_answer("none", re.compile(r"\d+")) is None
    rs = [rec(3, 0, "9"), rec(3, 1, "9"), rec(3, 2, "1")]
    assert majority_answers(rs, re.compile(r"\d")) == {3: "9"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_tokens=-1), r"filter.min_tokens: must be >= 0"),
    (dict(min_tokens=5, max_tokens=4), r"filter.max_tokens: must be >= min_tokens=5"),
    (dict(near_duplicate=0.0), r"filter.near_duplicate: must be in \(0, 1\]"),
    (dict(answer_regex="(unclosed"), r"filter.answer_regex: '\(unclosed' is not a valid"),
])
def test_bad_filter_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FilterConfig(**kwargs)


SHARD_FILTERS = dict(dedup=True, near_duplicate=0.6, ngram=2, finished_only=True,
                     min_tokens=1, answer_regex=r"answer is (\d)")


def _records():
    """Three shards of whole examples (two samples each or more): duplicates across
    shards, near-duplicates and disagreeing answers within examples, unfinished ones."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    out = []
    for ex in range(9):
        for j in range(3):
            body = " ".join(words[(ex + j + k) % 10] for k in range(5))
            answer = (ex + (j == 2)) % 10  # the third sample disagrees
            out.append(rec(ex, j, f"{body} so the answer is {answer}", prompt=f"q{ex % 4}",
                           finish="length" if (ex + j) % 7 == 0 else "eos"))
    out[12]["completion"], out[12]["prompt"] = out[1]["completion"], out[1]["prompt"]  # dup
    out[13]["completion"] = out[12]["completion"].replace("beta", "omega")
    out[14]["completion"] = out[13]["completion"].replace("zeta", "kappa")  # a near copy
    return [out[:9], out[9:18], out[18:]]


def test_curate_shards_equals_curating_the_whole_dataset():
    shards = _records()
    config = FilterConfig(**SHARD_FILTERS)
    want, want_dropped = curate([dict(r) for s in shards for r in s], config)
    written = {}
    read, kept, dropped = curate_shards(([dict(r) for r in s] for s in shards), config,
                                        lambda i, rs: written.setdefault(i, rs))
    assert sorted(written) == [0, 1, 2]  # every shard is written, in order
    got = [r for i in sorted(written) for r in written[i]]
    assert got == want and (read, kept, dropped) == (27, len(want), want_dropped)
    # the cross-shard exact duplicate (shard 1 repeats a record of shard 0) is dropped
    assert dropped["exact_duplicate"] >= 1 and all(dropped[k] for k in (
        "finished", "near_duplicate", "self_consistency"))
    assert all(r["answer"] is not None for r in got)


def test_curate_shards_refuses_an_example_split_over_shards():
    shards = _records()
    shards[1] = shards[1] + [rec(0, 7, "late sample so the answer is 0")]  # example 0 again
    with pytest.raises(ValueError, match="shard 1 holds example 0, which an earlier shard"):
        curate_shards(shards, FilterConfig(**SHARD_FILTERS), lambda i, rs: None)
