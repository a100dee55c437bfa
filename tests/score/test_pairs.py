"""Ranks and pairs from scores: ties, margins, equal scores and non-finite scores."""

import itertools

import numpy as np
import pytest

from kdjax.score.pairs import make_pairs, rank_of


def _brute_force(scores, min_margin):
    """Every (i, j) with i before j in (score desc, index asc) order and a margin ≥ m, > 0."""
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    out = [(order[a], order[b]) for a, b in itertools.combinations(range(len(order)), 2)]
    return [(c, r) for c, r in out
            if scores[c] - scores[r] > 0 and scores[c] - scores[r] >= min_margin]


@pytest.mark.parametrize("trial", range(20))
def test_all_pairs_and_ranks_match_a_brute_force(rng, trial):
    k = int(rng.integers(2, 7))
    scores = rng.integers(0, 4, k).astype(np.float32) / 2  # ties on purpose
    margin = float(rng.choice([0.0, 0.5, 1.0]))
    chosen, rejected, margins, why = make_pairs(scores, mode="all", min_margin=margin)
    want = _brute_force(scores.tolist(), margin)
    assert list(zip(chosen, rejected)) == want
    np.testing.assert_array_equal(margins, [scores[c] - scores[r] for c, r in want])
    order = sorted(range(k), key=lambda i: (-scores[i], i))
    assert rank_of(scores).tolist() == [order.index(i) for i in range(k)]
    assert (why is None) == bool(want)


def test_best_worst_ties_and_margin():
    s = [0.5, 2.0, 2.0, 0.5]
    assert make_pairs(s) == ([1], [3], [1.5], None)  # first of the best, last of the worst
    assert rank_of(s).tolist() == [2, 0, 1, 3]
    assert make_pairs(s, min_margin=1.6) == ([], [], [], "below_margin")
    assert make_pairs([3.0, 3.0, 3.0], mode="all") == ([], [], [], "all_equal")


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match=r"scores \[1.0, nan\] hold a non-finite value"):
        make_pairs([1.0, float("nan")])
    with pytest.raises(ValueError, match="pairs mode 'some'"):
        make_pairs([1.0, 0.0], mode="some")
