"""Fused attention kernels behind `DecoderConfig.attention_impl`: cuDNN flash attention
through `jax.nn.dot_product_attention` on GPU, Pallas splash attention on TPU.

Both compute what `attention.attend` (the XLA reference) computes for causal
self-attention over packed rows: query i sees key j when both are in the same segment,
`j <= i`, and with a sliding window w, `i - j < w`. Rows of padding (segment 0) are
arbitrary in every kernel. Scores (`attention_layers`) and KV-cache decoding always use
the reference, which `resolve` says.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import platform
from kdjax.sharding import current_mesh, logical_to_spec

SPLASH_BLOCKS = (512, 256, 128)  # splash tiles, largest that divides the length first
_FUSED_DTYPES = ("bfloat16", "float16")


def resolve(requested: str, length: int) -> str:
    """The kernel a causal self-attention of `length` rows runs: `requested` ("auto"
    → `platform.attention_impl()`). "auto" falls back to "xla" where the platform's
    kernel cannot take the shape (splash: length not a multiple of 128); an explicit
    choice that cannot run raises here, with the fix."""
    impl = platform.attention_impl(requested)
    if impl == "splash" and length % SPLASH_BLOCKS[-1]:
        if requested == "auto":
            return "xla"
        raise ValueError(f"attention_impl='splash' needs a sequence length that is a "
                         f"multiple of {SPLASH_BLOCKS[-1]}, got {length}; pad the rows or "
                         "use attention_impl='auto' (falls back to 'xla')")
    if impl == "cudnn" and platform.current() != "gpu":
        raise ValueError(f"attention_impl='cudnn' runs only on NVIDIA GPUs, but this step "
                         f"is compiled for {platform.current()!r}; use attention_impl="
                         "'auto' (the platform's kernel) or 'xla'")
    return impl


def cudnn_attention(q, k, v, segment_ids, sliding_window: int | None):
    """cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

    Args:
      q: `[B, L, heads, d]` bf16/f16; k, v: `[B, L, kv_heads, d]`; segment_ids: `[B, L]`
        int (0 = padding); sliding_window: None or w (keys `i - j < w` visible).
    Returns `[B, L, heads, d]` in q's dtype. The segment mask is passed as `mask` (cuDNN
    adds it as a bias); causality and the window go through `is_causal` and
    `local_window_size`, which cuDNN uses to skip masked blocks.
    """
    if q.dtype.name not in _FUSED_DTYPES:
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 compute, got "
                         f"{q.dtype.name}; set DecoderConfig.dtype='bfloat16' or "
                         "attention_impl='xla'")
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                        **dot_product_masks(segment_ids, sliding_window),
                                        implementation="cudnn")


def dot_product_masks(segment_ids, sliding_window: int | None) -> dict:
    """`jax.nn.dot_product_attention` keyword arguments for causal attention within
    segments (`[B, L]` int, 0 = padding) and an optional sliding window: the segment mask
    `[B, 1, L, L]`, `is_causal`, and `local_window_size = (w - 1, 0)`."""
    same = ((segment_ids[:, :, None] == segment_ids[:, None, :])
            & (segment_ids[:, None, :] != 0))
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return dict(mask=same[:, None], is_causal=True, local_window_size=window)


def splash_attention(q, k, v, segment_ids, sliding_window: int | None, *,
                     interpret: bool = False):
    """Pallas splash attention (TPU), in shard_map over the batch axes and the heads over
    `tensor` (as MaxText runs it): each device attends its own rows and heads.

    Args and return as `cudnn_attention`; any float dtype. q is scaled by `1/√d` first
    (the kernel applies no scale). `interpret=True` runs the kernel in Pallas' interpreter
    (any backend, slow): how the tests compare it with the reference on CPU.
    """
    _, _, n, d = q.shape
    kv = k.shape[2]
    q = (q.astype(jnp.float32) / np.sqrt(d)).astype(q.dtype)
    # the kernel's layout: heads before length
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k.astype(q.dtype), v.astype(q.dtype)))
    segment_ids = segment_ids.astype(jnp.int32)
    mesh = current_mesh()
    local = functools.partial(_splash_local, sliding_window=sliding_window,
                              interpret=interpret)
    if mesh is None:
        return local(q, k, v, segment_ids).transpose(0, 2, 1, 3)
    q_spec = logical_to_spec(("batch", "heads", "length", "head_dim"), mesh=mesh,
                             shape=q.shape)
    kv_spec = logical_to_spec(("batch", "kv_heads", "length", "head_dim"), mesh=mesh,
                              shape=k.shape)
    if q_spec[1] != kv_spec[1]:
        # kv heads do not split like the query heads (e.g. 2 kv heads on 4-way tensor):
        # give every query head its own copy, so each device holds the kv heads it uses
        k, v = (jnp.repeat(x, n // kv, axis=1) for x in (k, v))
        kv_spec = q_spec
    seg_spec = logical_to_spec(("batch", "length"), mesh=mesh, shape=segment_ids.shape)
    out = jax.shard_map(local, mesh=mesh,
                        in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                        check_vma=False)(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)


def _splash_local(q, k, v, segment_ids, sliding_window, interpret):
    """`[b, heads, L, d]`, `[b, kv, L, d]` ×2, `[b, L]` → `[b, heads, L, d]` on one device."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _splash_kernel(q.shape[1], q.shape[2], sliding_window, interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
        q, k, v, segment_ids)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, sliding_window: int | None, interpret: bool):
    """The splash kernel for `heads` query heads over `length` rows (its block-sparsity
    tables are built in NumPy, so it is cached per shape)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if sliding_window is None:
        mask = sa.CausalMask(shape)
    else:  # key j visible to query i when i - (w - 1) <= j <= i
        mask = sa.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    block = next(bs for bs in SPLASH_BLOCKS if length % bs == 0)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
