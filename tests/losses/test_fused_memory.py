"""The memory property, from the compiled program (deterministic, nothing is run).

fwd+bwd of fused_distill keeps no `[N, V]` array: its temp memory is a small fraction
of the naive program's, and it grows with N only by O(N·H) terms (the dh buffer),
never by N·V. `jax.jit(f).lower(...).compile().memory_analysis()` is XLA's own buffer
assignment for the whole program.
"""

import jax
import jax.numpy as jnp
import pytest

from kdjax.losses import TeacherHead, forward_kl, fused_distill

H, V, CHUNK = 64, 8192, 128
F32 = jnp.float32


def _temp_bytes(fn, *shapes, dtype=F32):
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _fused(h, w, t):
    return fused_distill(h, w, t, chunk_size=CHUNK, divergence="jsd")[0].mean()


def _naive(h, w, t):
    return jnp.mean(forward_kl(h @ w, t))


@pytest.fixture(scope="module")
def fused_temp():
    return {n: _temp_bytes(_fused, (n, H), (H, V), (n, V)) for n in (1024, 16384)}


def test_fused_temp_is_a_small_fraction_of_naive(fused_temp):
    n = 16384
    naive = _temp_bytes(_naive, (n, H), (H, V), (n, V))
    logits_bytes = n * V * 4
    assert naive >= logits_bytes  # the naive program does hold [N, V] logits
    assert fused_temp[n] < 0.1 * logits_bytes, (fused_temp[n], logits_bytes)
    assert fused_temp[n] < 0.1 * naive
    # What is there: a few [C, V] chunk arrays, the f32 dW [H, V] and dh [N, H].
    assert fused_temp[n] <= 8 * CHUNK * V * 4 + 2 * H * V * 4 + 4 * n * H * 4


def test_fused_temp_grows_only_by_n_times_h(fused_temp):
    dn = 16384 - 1024
    growth = fused_temp[16384] - fused_temp[1024]
    # dh in f32 plus its cast: a few N·H buffers; one extra N·V f32 row block would be
    # dn·V·4 = 480 MiB, 32× more than this bound.
    assert growth <= 4 * dn * H * 4, (growth, dn * H * 4)


def test_teacher_head_never_materializes_teacher_logits():
    n, ht = 16384, 32

    def fused(h, w, hidden_t, w_t):
        return fused_distill(h, w, TeacherHead(hidden_t, w_t), chunk_size=CHUNK)[0].mean()

    args = [jax.ShapeDtypeStruct(s, F32) for s in ((n, H), (H, V), (n, ht), (ht, V))]
    compiled = jax.jit(jax.value_and_grad(fused, (0, 1))).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * n * V * 4


def test_bf16_teacher_is_sliced_in_place():
    # XLA:CPU converts a whole bf16 [N, V] array to f32 before a dynamic slice of it in
    # the chunk loop (4·N·V bytes); up to ChunkRows.MAX_SWITCH_CHUNKS chunks the kernel
    # slices 16-bit rows with static slices instead (kdjax/losses/fused/kernel.py), so
    # the temp memory grows with N by O(N·H) terms only: 8 → 32 chunks here.
    small, big = (_temp_bytes(_fused, (n, H), (H, V), (n, V), dtype=jnp.bfloat16)
                  for n in (1024, 4096))
    dn = 4096 - 1024
    assert big - small <= 4 * dn * H * 4, (big - small, dn * V * 2)


def test_bf16_teacher_with_many_chunks_is_never_upcast_whole():
    # Past MAX_SWITCH_CHUNKS (whose compile time grows faster than linearly) the rows are
    # sliced as uint16 bits: one 2-byte copy of the teacher and of hidden, never the
    # f32 one (4 bytes per element), + the chunk arrays, dW and dh.
    n = 16384  # 128 chunks
    temp = _temp_bytes(_fused, (n, H), (H, V), (n, V), dtype=jnp.bfloat16)
    assert temp <= n * V * 2 + 8 * CHUNK * V * 4 + 2 * H * V * 4 + 4 * n * H * 4, temp


def test_bf16_lm_head_is_not_copied_to_f32():
    # XLA:CPU runs the 16-bit dh = dz·Wᵀ dot in f32 and would hoist an f32 copy of the
    # whole lm_head out of the loop (4·H·V bytes); the kernel pins a bf16 transposed copy
    # (2·H·V) instead. Beyond the f32 program's temp memory, bf16 adds that copy and the
    # f32 dW accumulator, which the bf16 gradient output cannot alias (4·H·V).
    n, h = 1024, 512
    f32, bf16 = (_temp_bytes(_fused, (n, h), (h, V), (n, V), dtype=dt)
                 for dt in (F32, jnp.bfloat16))
    assert bf16 - f32 <= (4 + 2) * h * V + 2 * n * h * 4, (bf16 - f32, h * V * 4)
