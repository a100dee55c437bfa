"""The chunk loop: lax.scan over token chunks, f32 accumulation of the lm_head gradient.

Only one chunk's `[C, V]` arrays are alive at a time. The per-token inputs are sliced
in place with dynamic_slice (no padded copy of a dense teacher); when C does not divide
N the last chunk overlaps the previous one and counts only its new rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kdjax import platform
from kdjax.losses.fused._chunk import ChunkSpec, chunk_loss

F32 = jnp.float32

_MIN_CHUNK, _MAX_CHUNK = 64, 4096


def auto_chunk_size(n: int, hidden: int, vocab: int) -> int:
    """Token chunk size from N, H, V: the power of two with C·V·4 bytes ≈ 32 MiB.

    The chunk's f32 logits then take ~32 MiB whatever N is, so the temp memory does not
    grow with N·V. At least 64 rows, so that the h_cᵀ dz update of the `[H, V]` f32
    accumulator stays compute-bound (its arithmetic intensity is ~C/6 FLOP/byte), and
    at most 4096 and N. `hidden` is accepted for rules that also weigh H.
    """
    del hidden
    c = max(_MIN_CHUNK, min(_MAX_CHUNK, platform.fused_chunk_bytes() // (4 * vocab)))
    c = 1 << (c.bit_length() - 1)  # round down to a power of two
    return int(max(1, min(c, n)))


def run_chunks(h, w_mat, chunk, shared, targets, w, temperature, weights, *,
               spec: ChunkSpec, chunk_size: int, need_grad: bool):
    """Σ over chunks of `chunk_loss`.

    Args:
      h: `[N, H]`; w_mat: `[H, V_local]`; chunk: tuple of `[N, ...]` teacher arrays;
      shared: tuple of teacher arrays used whole; targets: `[N]` int or None; w: `[N]` f32.

    Returns:
      `(parts [2] f32, dh [N, H] (h.dtype) | None, dW [H, V_local] f32 | None)`.
    """
    n, hdim = h.shape
    w_mat = w_mat.astype(h.dtype)  # matmuls in the compute dtype; the caller's dW stays f32
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    # On XLA:CPU, 16-bit floats enter the loop as their bits: its float normalization
    # treats a bf16 dynamic-slice as unsupported and upcasts the whole bf16 [N, V]
    # teacher to f32 before the loop (4·N·V bytes). The bitcast is not elided either,
    # so a 2·N·V-byte copy remains (tests/losses/test_fused_memory.py); GPU/TPU slice
    # bf16 natively and get the arrays untouched. The choice keys on the platform the
    # step is compiled for (kdjax.platform), so an AOT compile for TPU gets the TPU form.
    dtypes = jax.tree.map(lambda x: x.dtype, (h, chunk, targets))
    rows = jax.tree.map(_to_bits, (h, chunk, targets))

    def step(carry, i):
        parts, dh, dw = carry
        # The last chunk starts at N − C (one compiled body, no padded copy of the
        # inputs); rows it shares with the previous chunk get weight 0 there.
        start = jnp.minimum(i * c, n - c)
        hc, tc, yc = jax.tree.map(lambda x, dt: _from_bits(
            lax.dynamic_slice_in_dim(x, start, c), dt), rows, dtypes)
        fresh = start + jnp.arange(c) >= i * c
        wc = jnp.where(fresh, lax.dynamic_slice_in_dim(w, start, c), 0.0)
        p, dh_c, dw_c = chunk_loss(hc, w_mat, tc, shared, yc, wc, temperature, weights,
                                   spec, need_grad)
        if need_grad:  # weight-0 rows have exactly zero gradient, so adding is safe
            dw = dw + dw_c
            dh = lax.dynamic_update_slice_in_dim(
                dh, lax.dynamic_slice_in_dim(dh, start, c) + dh_c, start, axis=0)
        return (parts + p, dh, dw), None

    init = (jnp.zeros(spec.num_parts, F32), None, None)
    if need_grad:
        init = (init[0], jnp.zeros((n, hdim), F32), jnp.zeros((hdim, w_mat.shape[1]), F32))
    (parts, dh, dw), _ = lax.scan(step, init, jnp.arange(n_chunks))
    return parts, (None if dh is None else dh.astype(h.dtype)), dw


def _to_bits(x):
    if (jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 2
            and platform.slice_16bit_as_bits()):
        return lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x, dtype):
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x
