"""Ranks and chosen/rejected pairs from the scores of one prompt's K candidates.

`rank[k]` is candidate k's place when the scores are sorted from best to worst, ties
broken by index (the earlier candidate ranks first; `kdjax.losses.pro` orders the same
way). Pairs (chosen index, rejected index, margin = score difference):

- `best_worst`: the first-ranked vs the last-ranked candidate;
- `all`: every (i, j) with i ranked before j, in rank order;

keeping those whose margin is > 0 and ≥ `min_margin`. A prompt whose scores are all equal
gives no pair (`all_equal`), nor one whose differences are all below the margin
(`below_margin`); both are counted, never turned into a pair of equal scores.
"""

from __future__ import annotations

import numpy as np

NO_PAIR = ("all_equal", "below_margin")


def order_of(scores) -> np.ndarray:
    """Candidate indices from best to worst (ties: lower index first)."""
    s = np.asarray(scores, np.float64)
    return np.lexsort((np.arange(len(s)), -s))


def rank_of(scores) -> np.ndarray:
    """`[K]` int32 rank of each candidate (0 = best)."""
    order = order_of(scores)
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


def make_pairs(scores, *, mode: str = "best_worst", min_margin: float = 0.0
               ) -> tuple[list[int], list[int], list[float], str | None]:
    """(chosen indices, rejected indices, margins, why there is none or None).

    Raises:
      ValueError: a score is NaN or infinite (it cannot be ranked).
    """
    s = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores {s.tolist()} hold a non-finite value; they cannot be ranked")
    if mode not in ("best_worst", "all"):
        raise ValueError(f"pairs mode {mode!r} is not one of ['best_worst', 'all']")
    order = order_of(s)
    if mode == "best_worst":
        candidates = [(int(order[0]), int(order[-1]))]
    else:
        candidates = [(int(order[a]), int(order[b])) for a in range(len(order))
                      for b in range(a + 1, len(order))]
    chosen, rejected, margins = [], [], []
    for c, r in candidates:
        margin = float(s[c] - s[r])
        if margin > 0 and margin >= min_margin:
            chosen.append(c)
            rejected.append(r)
            margins.append(margin)
    why = None
    if not chosen:
        why = "all_equal" if s.max() == s.min() else "below_margin"
    return chosen, rejected, margins, why
