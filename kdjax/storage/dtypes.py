"""Smallest unsigned integer dtypes for ids and counts, and checked casts into them."""

from __future__ import annotations

import numpy as np

_UNSIGNED = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))


def smallest_uint(max_value: int) -> np.dtype:
    """The smallest unsigned dtype whose range includes `max_value` (>= 0)."""
    max_value = int(max_value)
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    for dt in _UNSIGNED:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"max_value {max_value} does not fit in 64 bits")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for token ids of a vocabulary of `vocab_size`.

    Ids lie in [0, vocab_size); the dtype's maximum value is kept free (never a valid
    id). Empty sampled slots are not marked by the id but by count 0 (with id 0).
    Hence V <= 255 → uint8, V <= 65,535 → uint16, larger vocabularies (e.g. 128k, 152k)
    → uint32.
    """
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return smallest_uint(vocab_size)


def cast_checked(values: np.ndarray, dtype, *, name: str = "values") -> np.ndarray:
    """`values.astype(dtype)`, refusing (never wrapping) any value outside `dtype`'s range."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if values.size and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name} has values in [{lo}, {hi}] that do not fit {dtype} "
                             f"([{info.min}, {info.max}]); use a wider dtype (for ids, "
                             "id_dtype(vocab_size) with the true vocabulary size)")
    return values.astype(dtype, copy=False)
