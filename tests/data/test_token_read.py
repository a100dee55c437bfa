"""The loader's fast targets/positions derivation equals the packing reference."""

import numpy as np
import pytest

from kdjax.data.pack import derive_targets_positions
from kdjax.data.token_store import targets_positions


@pytest.mark.parametrize("seg_dtype", [np.uint8, np.uint16, np.int32])
def test_targets_positions_equal_pack_reference(rng, seg_dtype):
    for trial in range(60):
        rows, length = int(rng.integers(0, 5)), int(rng.integers(1, 40))
        if trial % 2:  # packed rows: increasing segments, then padding (0)
            seg = np.sort(rng.integers(0, 4, (rows, length)), axis=1)[:, ::-1]
        else:  # arbitrary ids, repeats and zeros anywhere
            seg = rng.integers(0, 3, (rows, length))
        tokens = rng.integers(0, 2**31 - 1, (rows, length)).astype(np.uint32)
        want = derive_targets_positions(tokens, seg.astype(seg_dtype))
        got = targets_positions(tokens, seg.astype(seg_dtype))
        for g, w in zip(got, want):
            assert g.dtype == np.int32 and g.shape == (rows, length)
            np.testing.assert_array_equal(g, w)
