"""`fused_distill` over a device mesh: tokens split over the batch axes, vocabulary over one.

Inside shard_map every device holds its own tokens `hidden [N/d, H]` (never gathered)
and `lm_head [H, V/t]`: the lm_head arrives gathered over the other axes like any FSDP
weight. Per chunk, with a vocab axis, the student (and teacher) logsumexp combine shards
with pmax/psum, the divergence is the psum of the per-shard sums of the
`divergences.POINTWISE` terms, the CE target logit is gathered by the shard that owns
it, and `dh` is psum'd over the vocab axis (Megatron-LM's vocab-parallel cross-entropy,
Shoeybi et al., 2019). The f32 lm_head gradient stays on its device through the sweep
and is reduced once at the end: psum over the batch axes, or reduce-scattered over the
axis that shards the lm_head's rows (FSDP), so only parameter-sized values ever move.

The custom VJP sits outside shard_map (no autodiff through collectives): the forward
shard_map returns the loss parts and both gradients, the backward pass scales them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax.losses.fused import _args
from kdjax.losses.fused._scan import auto_chunk_size, run_chunks
from kdjax.losses.fused.distill import fused_distill_impl
from kdjax.losses.fused.teachers import teacher_form

Axes = str | tuple[str, ...] | None


def axis_names(axis: Axes) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


@dataclasses.dataclass(frozen=True)
class MeshRun:
    """Sweep the chunks of each device's (token shard, vocab shard) under shard_map.

    `data_axis` splits tokens, `vocab_axis` (or None) the vocabulary; `grad_scatter_axis`
    (one of the data axes, or None) receives the lm_head gradient reduce-scattered over
    its rows (H) instead of all-reduced.
    """

    mesh: Mesh
    data_axis: Axes
    vocab_axis: str | None = None
    grad_scatter_axis: str | None = None

    def __call__(self, plan, h, w_mat, chunk, shared, targets, w, temperature, weights,
                 need_grad):
        d, v, scatter = self.data_axis, self.vocab_axis, self.grad_scatter_axis
        chunk_specs = {"dense": (P(d, v),), "head": (P(d, None),), "none": ()}.get(
            plan.spec.form, (P(d, None), P(d, None)))
        shared_specs = tuple(P(None, v) for _ in shared)
        has_targets = targets is not None
        reduce_axes = tuple(a for a in axis_names(d) if a != scatter)

        def body(h, w_mat, chunk, shared, w, temperature, weights, *maybe_targets):
            y = maybe_targets[0] if has_targets else None
            parts, dh, dw = run_chunks(h, w_mat, chunk, shared, y, w, temperature, weights,
                                       spec=plan.spec, chunk_size=plan.chunk_size,
                                       need_grad=need_grad)
            if d is not None:
                parts = jax.lax.psum(parts, axis_names(d))
            if dw is not None:
                if reduce_axes:
                    dw = jax.lax.psum(dw, reduce_axes)
                if scatter is not None:
                    dw = jax.lax.psum_scatter(dw, scatter, scatter_dimension=0, tiled=True)
            return (parts, dh, dw) if need_grad else parts

        in_specs = (P(d, None), P(None, v), chunk_specs, shared_specs, P(d), P(), P())
        # Cast before shard_map: an f32 lm_head is gathered in the compute dtype.
        args = (h, w_mat.astype(h.dtype), chunk, shared, w, temperature, weights)
        if has_targets:
            in_specs, args = (*in_specs, P(d)), (*args, targets)
        out_specs = (P(), P(d, None), P(scatter, v)) if need_grad else P()
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
        out = fn(*args)
        return out if need_grad else (out, None, None)


def axis_size(mesh: Mesh, axis: Axes, name: str) -> int:
    for a in axis_names(axis):
        if a not in mesh.shape:
            raise ValueError(f"{name}={a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in axis_names(axis))


def check_mesh_split(mesh: Mesh, n: int, hdim: int, v: int, *, data_axis: Axes,
                     vocab_axis: str | None, grad_scatter_axis: str | None = None) -> int:
    """Checks that tokens, V and H divide by their mesh axes; returns the data-parallel size."""
    tp = axis_size(mesh, vocab_axis, "vocab_axis")
    dp = axis_size(mesh, data_axis, "data_axis")
    if grad_scatter_axis is not None:
        if grad_scatter_axis not in axis_names(data_axis):
            raise ValueError(f"grad_scatter_axis={grad_scatter_axis!r} must be one of the data "
                             f"axes {axis_names(data_axis)}")
        fs = axis_size(mesh, grad_scatter_axis, "grad_scatter_axis")
        if hdim % fs:
            raise ValueError(f"hidden size H={hdim} does not divide by the "
                             f"{grad_scatter_axis!r} mesh axis size {fs}; pass "
                             "grad_scatter_axis=None (the lm_head gradient is all-reduced)")
    if v % tp:
        raise ValueError(f"vocabulary size V={v} does not divide by the {vocab_axis!r} mesh "
                         f"axis size {tp}; pad lm_head (and the teacher) to a multiple of {tp}")
    if n % dp:
        raise ValueError(f"{n} tokens do not divide by the data-parallel size {dp} "
                         f"(data_axis={data_axis!r}); pad the batch to a multiple of {dp}")
    return dp


def sharded_fused_distill(hidden, lm_head, teacher, *, mesh: Mesh, data_axis: Axes,
                          vocab_axis: str | None = None, grad_scatter_axis: str | None = None,
                          chunk_size=None, **kwargs):
    """`fused_distill` with tokens split over `data_axis` and, optionally, the vocabulary
    over `vocab_axis`: each device runs the fused loss on its own tokens only.

    Args:
      hidden, lm_head, teacher (any form, or None for CE only), and every keyword of
        `fused_distill` (targets, mask, divergence, temperature, weights,
        logit_softcap, with_top1, divergence arguments).
      mesh: the device mesh; axis names come from the caller (e.g. `kdjax.sharding`).
      data_axis: mesh axis (or tuple of axes) that splits the tokens (the flattened
        leading axes of `hidden`), or None. Tokens must divide by its size.
      vocab_axis: mesh axis that splits the vocabulary (V must divide by its size), or
        None (each device holds the whole lm_head).
      grad_scatter_axis: one of the data axes, or None. The lm_head gradient is
        reduce-scattered over it along H (FSDP: the gradient lands in the lm_head's own
        row sharding) instead of all-reduced. H must divide by its size.
      chunk_size: tokens per chunk on each device (None: auto from the local N, H, V).

    Other mesh axes replicate the computation. A dense teacher or TeacherHead with a
    padded vocabulary (V_t > V) is sliced to the student's V first. `adaptive_kl` needs
    a sort over the whole vocabulary and raises with a vocab axis.

    Returns:
      `(loss, metrics)` exactly as `fused_distill`, equal to the unsharded result.
    """
    n, hdim, v = _args.check_student(hidden, lm_head)
    teacher_form(teacher)  # type check before anything is traced
    _args.check_chunk_size(chunk_size)
    dp = check_mesh_split(mesh, n, hdim, v, data_axis=data_axis, vocab_axis=vocab_axis,
                          grad_scatter_axis=grad_scatter_axis)
    tp = axis_size(mesh, vocab_axis, "vocab_axis")
    c = chunk_size or auto_chunk_size(n // dp, hdim, v // tp)
    run = MeshRun(mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis,
                  grad_scatter_axis=grad_scatter_axis)
    return fused_distill_impl(hidden, lm_head, teacher, run=run, vocab_axis=vocab_axis,
                              chunk_size=c, **kwargs)


def vocab_parallel_distill(hidden, lm_head, teacher, *, mesh: Mesh, vocab_axis: str,
                           data_axis: Axes = None, chunk_size=None, **kwargs):
    """`sharded_fused_distill` with `lm_head` sharded over `vocab_axis` (required) and
    tokens over `data_axis` (or replicated). Equal to the unsharded `fused_distill`."""
    axis_size(mesh, vocab_axis, "vocab_axis")
    return sharded_fused_distill(hidden, lm_head, teacher, mesh=mesh, data_axis=data_axis,
                                 vocab_axis=vocab_axis, chunk_size=chunk_size, **kwargs)
