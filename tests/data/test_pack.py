"""Packing: every next-token prediction of every document exactly once, no segment
crossing, pre-shifted targets, positions, padding."""

import numpy as np
import pytest

from kdjax.data.pack import derive_targets_positions, fill_rows, plan_packing


def make_docs(rng, n, max_len):
    lengths = rng.integers(1, max_len, size=n)
    return {d: (rng.integers(5, 1000, size=k), rng.random(k) < 0.7)
            for d, k in enumerate(lengths)}, lengths


def segments(rows):
    """(row, segment id, columns) of every segment."""
    for r, seg in enumerate(rows["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            yield r, s, np.flatnonzero(seg == s)


@pytest.mark.parametrize("mode", ["split", "pad"])
def test_every_prediction_exactly_once(rng, mode):
    seq_len = 16
    docs, lengths = make_docs(rng, 60, 40)
    plan = plan_packing(lengths, seq_len, mode)
    rows = fill_rows(plan, 0, plan.num_rows, docs, seq_len)
    targets, positions = derive_targets_positions(rows["tokens"], rows["segment_ids"])
    # an independent reference: collect (doc, index of predicted token) for loss positions
    seen = []
    for r, _, cols in segments(rows):
        assert (np.diff(cols) == 1).all(), "a segment must be contiguous"
        i = np.flatnonzero((plan.row == r) & (plan.col == cols[0]))[0]
        d, start = plan.doc[i], plan.start[i]
        ids, train = docs[d]
        np.testing.assert_array_equal(rows["tokens"][r, cols], ids[start:start + len(cols)])
        np.testing.assert_array_equal(targets[r, cols[:-1]], ids[start + 1:start + len(cols)])
        np.testing.assert_array_equal(positions[r, cols], np.arange(len(cols)))
        assert not rows["loss_mask"][r, cols[-1]] and targets[r, cols[-1]] == 0
        for c in cols[:-1]:
            if rows["loss_mask"][r, c]:
                seen.append((d, start + c - cols[0] + 1))
    expected = [(d, j) for d, (ids, train) in docs.items() if len(ids) >= 2
                for j in range(1, len(ids)) if train[j]]
    assert sorted(seen) == sorted(expected)
    pad = rows["segment_ids"] == 0
    assert not rows["loss_mask"][pad].any() and (positions[pad] == 0).all()
    assert (targets[pad] == 0).all()
    if mode == "split":  # at most one pad token per row (a 1-token remainder), but the last
        assert (pad[:-1].sum(axis=1) <= 1).all()
    else:  # documents that fit in a row are never split
        fits = lengths[plan.doc] <= seq_len
        assert (plan.length[fits] == lengths[plan.doc[fits]]).all()


def test_rows_in_pieces_equal_rows_at_once(rng):
    docs, lengths = make_docs(rng, 30, 25)
    plan = plan_packing(lengths, 8)
    whole = fill_rows(plan, 0, plan.num_rows, docs, 8)
    parts = [fill_rows(plan, lo, min(lo + 3, plan.num_rows), docs, 8)
             for lo in range(0, plan.num_rows, 3)]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="pack mode"):
        plan_packing(np.array([3]), 8, "greedy")
    with pytest.raises(ValueError, match="seq_len"):
        plan_packing(np.array([3]), 1)
    assert plan_packing(np.array([1, 0]), 8).num_rows == 0
