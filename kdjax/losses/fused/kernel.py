"""The fused loss on one chunk of tokens, and the sweep over the chunks.

One chunk of C tokens: raw = h_c @ W (f32 accumulation), z = softcap(raw),
logq = z/T − logsumexp(z/T). With g = Σ_c w_c ∂D_c/∂logq from the teacher form
(`teachers.py`), the softmax backward gives ∂/∂z = (g − q · Σ_v g_v) / T, scaled by
kd_weight; the hard-label CE adds ce_weight · w · (softmax(z) − onehot(target)). Then
d_hidden_c = dz Wᵀ and dW += h_cᵀ dz.

With 16-bit inputs the matmuls take dz in 16 bits. When both terms are in the gradient,
each term is rounded on its own and the two are stacked into one matmul of 2C rows:
rounding their sum would lose the smaller term whenever it is below the larger one's
rounding step (at α = 0.999 the KD gradient is 1/1000 of the CE gradient, under bf16's
2⁻⁹ relative step). This doubles the backward matmul FLOPs of mixed-α 16-bit runs only.
Every vocabulary reduction goes through `vocab`, so the same code runs on a vocab-sharded
chunk inside shard_map.

The sweep is a lax.scan over token chunks with f32 accumulation of the lm_head gradient:
only one chunk's `[C, V]` arrays are alive at a time. The per-token inputs are sliced in
place (no padded copy of a dense teacher); when C does not divide N the last chunk
overlaps the previous one and counts only its new rows. Over a mesh (`MeshAxes`) the
same sweep runs inside shard_map on each device's own tokens and vocabulary shard (see
`parallel.py` for the collectives).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax import linalg, platform
from kdjax.losses.fused import vocab

F32 = jnp.float32
Axes = str | tuple[str, ...] | None

_MIN_CHUNK, _MAX_CHUNK = 64, 4096


def axis_names(axis: Axes) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static description of a fused problem (hashable: a jit/custom_vjp static argument).
    What differs between teacher forms lives on the teacher (`teachers.py`)."""

    divergence: str
    divergence_kwargs: tuple[tuple[str, Any], ...]
    vocab_size: int  # the student's global V
    chunk_size: int  # tokens per chunk (per device over a mesh)
    logit_softcap: float | None = None  # the student's
    with_ce: bool = False  # targets given: CE is computed (as a metric at least)
    ce_in_grad: bool = False  # ce_weight may be nonzero: CE enters the gradient
    temperature_is_one: bool = False
    vocab_axis: str | None = None  # the mesh axis that splits the vocabulary, in shard_map
    with_top1: bool = False  # also count tokens whose student argmax is the teacher's

    @property
    def num_parts(self) -> int:
        """Loss parts per sweep: [Σ w·D, Σ w·CE] (+ Σ w·[top-1 agrees])."""
        return 3 if self.with_top1 else 2


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """How a sweep is split over a mesh: tokens over `data_axis` (one axis, a tuple, or
    None), the vocabulary over `vocab_axis` (or None); `grad_scatter_axis` (one of the data
    axes, or None) receives the lm_head gradient reduce-scattered over its rows (H)
    instead of all-reduced."""

    mesh: Mesh
    data_axis: Axes = None
    vocab_axis: str | None = None
    grad_scatter_axis: str | None = None

    def size(self, axis: Axes) -> int:
        return math.prod(self.mesh.shape[a] for a in axis_names(axis))

    def shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Bits:
    """A 16-bit float array carried through the chunk loop as its uint16 bits."""

    bits: jax.Array
    dtype: Any = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class ChunkRows:
    """Cuts per-token arrays `[n, ...]` into chunks of c rows: chunk i holds rows
    [start_i, start_i + c), start_i = min(i·c, n − c) (the last chunk overlaps the one
    before). `carry(x)` prepares an array before the loop, `take(x, i)` slices it in it.

    On XLA:CPU a dynamic slice of a 16-bit float array is not supported natively: float
    normalization upcasts the whole `[N, V]` array to f32 before the loop (4·N·V bytes).
    There 16-bit arrays are sliced with static slices instead, one lax.switch branch per
    chunk, which read the argument in place (no copy). XLA:CPU's compile time grows
    faster than linearly with the branches (~+0.1 s each up to 64, 24 s at 256), so
    beyond `MAX_SWITCH_CHUNKS` chunks the arrays are sliced as their uint16 bits, whose
    bitcast is not elided: a 2·N·V-byte copy. GPU/TPU slice 16-bit floats natively. The
    choice keys on the platform the step is compiled for (`kdjax.platform`).
    """

    n: int
    c: int

    MAX_SWITCH_CHUNKS = 32

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.c)

    def start(self, i):
        return jnp.minimum(i * self.c, self.n - self.c)

    def _cpu_16bit(self, x) -> bool:
        return (self.num_chunks > 1 and jnp.issubdtype(x.dtype, jnp.floating)
                and jnp.dtype(x.dtype).itemsize == 2 and platform.is_cpu())

    def carry(self, x):
        if self._cpu_16bit(x) and self.num_chunks > self.MAX_SWITCH_CHUNKS:
            return _Bits(lax.bitcast_convert_type(x, jnp.uint16), x.dtype)
        return x

    def take(self, x, i):
        if self.num_chunks == 1:  # c == n
            return x
        if isinstance(x, _Bits):
            rows = lax.dynamic_slice_in_dim(x.bits, self.start(i), self.c)
            return lax.bitcast_convert_type(rows, x.dtype)
        if self._cpu_16bit(x):
            starts = (min(k * self.c, self.n - self.c) for k in range(self.num_chunks))
            return lax.switch(i, [partial(lax.slice_in_dim, start_index=s, limit_index=s + self.c)
                                  for s in starts], x)
        return lax.dynamic_slice_in_dim(x, self.start(i), self.c)


def transposed_head(lm_head):
    """A copy of lm_head.T for the chunks' d_hidden = dz·Wᵀ, or None (each chunk's dot takes
    lm_head.T, a free operand layout; a transpose outside the loop would be copied).

    XLA:CPU runs a 16-bit dot that contracts lm_head's last axis in f32 and hoists an f32
    copy of the whole lm_head out of the loop (4·H·V bytes); a 16-bit transposed copy
    made once, pinned by an optimization barrier so that XLA does not fold it back into
    the dot, takes 2·H·V bytes and keeps    the dot in 16 bits."""
    if jnp.dtype(lm_head.dtype).itemsize == 2 and platform.is_cpu():
        return lax.optimization_barrier(lm_head.T)
    return None


def chunk_loss(spec: LossSpec, hidden, lm_head, teacher, targets, token_weights, temperature,
               term_weights, need_grad: bool, lm_head_t=None):
    """Loss parts of one chunk and, if `need_grad`, the gradients of
    Σ w (kd_weight·D + ce_weight·CE).

    Args:
      hidden: `[C, H]` student hidden chunk (f32/bf16). lm_head: `[H, V_local]` (a shard
        over a vocab axis), in hidden's dtype.
      teacher: a teacher form (`teachers.py`) holding this chunk's rows.
      targets: `[C]` int or None. token_weights: `[C]` f32 (0 = masked or padding).
      temperature: f32 scalar. term_weights: f32 `[2]`, (kd_weight, ce_weight).
      lm_head_t: `transposed_head(lm_head)`, made once per sweep (None: lm_head.T).

    Returns:
      `(parts f32 [spec.num_parts], dh [C, H] f32 | None, dW [H, V_local] f32 | None)`,
      parts = [Σ w·D, Σ w·CE] and, with `spec.with_top1`, Σ w·[argmax z = teacher top-1].
    """
    axis = spec.vocab_axis
    raw = jnp.dot(hidden, lm_head, preferred_element_type=F32)
    z, dcap = vocab.softcap(raw, spec.logit_softcap)
    zt = z if spec.temperature_is_one else z / temperature
    lse = vocab.logsumexp(zt, axis)
    logq = zt - lse[:, None]
    div, g, top1 = teacher.terms(logq, token_weights, temperature, spec, need_grad)
    live = token_weights != 0
    parts = [jnp.sum(jnp.where(live, token_weights * div, 0.0))]
    if spec.with_ce:
        lse1 = lse if spec.temperature_is_one else vocab.logsumexp(z, axis)
        z_target = vocab.take(z, targets[:, None], axis)[:, 0]
        valid = (targets >= 0) & (targets < spec.vocab_size)
        ce = jnp.where(valid, lse1 - z_target, jnp.nan)  # out-of-range target: loud NaN
        parts.append(jnp.sum(jnp.where(live, token_weights * ce, 0.0)))
    else:
        parts.append(jnp.zeros((), F32))
    if spec.with_top1:
        agree = (vocab.argmax(z, axis) == top1).astype(F32)
        parts.append(jnp.sum(jnp.where(live, token_weights * agree, 0.0)))
    if not need_grad:
        return jnp.stack(parts), None, None
    lm_head_t = lm_head.T if lm_head_t is None else lm_head_t
    terms = []  # the gradient of each term with respect to z, [C, V_local] f32
    if g is not None:
        s = vocab.psum(jnp.sum(g, axis=-1), axis)
        dz_kd = g - jnp.exp(logq) * s[:, None]
        scale = term_weights[0] if spec.temperature_is_one else term_weights[0] / temperature
        terms.append(scale * dz_kd)
    if spec.with_ce and spec.ce_in_grad:
        soft = jnp.exp(z - lse1[:, None]) - vocab.one_hot(targets, z.shape[-1], axis)
        terms.append((term_weights[1] * token_weights)[:, None] * soft)
    if not terms:
        terms.append(jnp.zeros_like(z))
    if dcap is not None:
        terms = [t * dcap for t in terms]
    if len(terms) == 2 and jnp.dtype(hidden.dtype).itemsize < 4:  # round each on its own
        dz, hs = jnp.concatenate(terms).astype(hidden.dtype), jnp.concatenate([hidden, hidden])
        d_hidden2 = jnp.dot(dz, lm_head_t, preferred_element_type=F32)
        c = hidden.shape[0]
        d_hidden = vocab.psum(d_hidden2[:c] + d_hidden2[c:], axis)
        d_lm_head = linalg.weight_grad(hs, dz, preferred_element_type=F32)
        return jnp.stack(parts), d_hidden, d_lm_head
    dz = sum(terms[1:], terms[0]).astype(hidden.dtype)  # 16-bit inputs: 16-bit matmuls
    d_hidden = vocab.psum(jnp.dot(dz, lm_head_t, preferred_element_type=F32), axis)
    d_lm_head = linalg.weight_grad(hidden, dz, preferred_element_type=F32)  # fast form on XLA:CPU
    return jnp.stack(parts), d_hidden, d_lm_head


def _sweep_chunks(spec, hidden, lm_head, teacher, targets, token_weights, temperature,
                  term_weights, need_grad):
    n, hdim = hidden.shape
    c = min(spec.chunk_size, n)
    chunks = ChunkRows(n, c)
    lm_head_t = transposed_head(lm_head) if need_grad else None
    hidden_rows, teacher_rows = chunks.carry(hidden), teacher.map_rows(chunks.carry)

    def step(carry, i):
        parts, d_hidden, d_lm_head = carry
        start = chunks.start(i)
        rows = lambda x: chunks.take(x, i)
        # Rows the last chunk shares with the previous one get weight 0 here.
        fresh = start + jnp.arange(c) >= i * c
        p, d_hidden_c, d_lm_head_c = chunk_loss(
            spec, rows(hidden_rows), lm_head, teacher_rows.map_rows(rows),
            None if targets is None else rows(targets),
            jnp.where(fresh, rows(token_weights), 0.0), temperature, term_weights, need_grad,
            lm_head_t)
        if need_grad:  # weight-0 rows have exactly zero gradient, so adding is safe
            d_lm_head = d_lm_head + d_lm_head_c
            d_hidden = lax.dynamic_update_slice_in_dim(
                d_hidden, lax.dynamic_slice_in_dim(d_hidden, start, c) + d_hidden_c, start,
                axis=0)
        return (parts + p, d_hidden, d_lm_head), None

    init = (jnp.zeros(spec.num_parts, F32), None, None)
    if need_grad:
        init = (init[0], jnp.zeros((n, hdim), F32), jnp.zeros((hdim, lm_head.shape[1]), F32))
    (parts, d_hidden, d_lm_head), _ = lax.scan(step, init, jnp.arange(chunks.num_chunks))
    return parts, (None if d_hidden is None else d_hidden.astype(hidden.dtype)), d_lm_head


def sweep(spec: LossSpec, hidden, lm_head, teacher, targets, token_weights, temperature,
          term_weights, *, need_grad: bool, mesh_axes: MeshAxes | None = None):
    """Σ over chunks of `chunk_loss`, on this device or, with `mesh_axes`, in shard_map.

    Args:
      hidden: `[N, H]`; lm_head: `[H, V]`; teacher: a flattened teacher form (`[N, ...]`
      per-token arrays); targets: `[N]` int or None; token_weights: `[N]` f32.

    Returns:
      `(parts [spec.num_parts] f32, d_hidden [N, H] (hidden's dtype) | None, dW [H, V] f32 |
      None)`; over a mesh the parts are summed over the data axes and dW is all-reduced
      over them, or reduce-scattered over `grad_scatter_axis` along H.
    """
    # The matmuls run in the compute dtype; cast before shard_map, so that an f32 lm_head
    # is gathered in it. The f32 dW is returned unrounded.
    lm_head = lm_head.astype(hidden.dtype)
    args = (hidden, lm_head, teacher, targets, token_weights, temperature, term_weights)
    if mesh_axes is None:
        return _sweep_chunks(spec, *args, need_grad)
    d, v, scatter = mesh_axes.data_axis, mesh_axes.vocab_axis, mesh_axes.grad_scatter_axis
    reduce_axes = tuple(a for a in axis_names(d) if a != scatter)

    def body(*args):
        parts, d_hidden, d_lm_head = _sweep_chunks(spec, *args, need_grad)
        if d is not None:
            parts = lax.psum(parts, axis_names(d))
        if d_lm_head is not None:
            if reduce_axes:
                d_lm_head = lax.psum(d_lm_head, reduce_axes)
            if scatter is not None:
                d_lm_head = lax.psum_scatter(d_lm_head, scatter, scatter_dimension=0, tiled=True)
        return (parts, d_hidden, d_lm_head) if need_grad else parts

    in_specs = (P(d, None), P(None, v), teacher.partition_specs(d, v), P(d), P(d), P(), P())
    out_specs = (P(), P(d, None), P(scatter, v)) if need_grad else P()
    out = mesh_axes.shard_map(body, in_specs, out_specs)(*args)
    return out if need_grad else (out, None, None)
