"""Vocab-parallel `fused_distill`: lm_head sharded over a mesh axis, tokens over another.

Inside shard_map every device holds `hidden [N/d, H]` and `lm_head [H, V/t]`; per chunk
the student (and teacher) logsumexp combine shards with pmax/psum, the divergence is the
psum of the per-shard sums of the `divergences.POINTWISE` terms, the CE target logit is
gathered by the shard that owns it, and `dh` is psum'd over the vocab axis. Shards of
the f32 lm_head gradient stay on their devices and are psum'd over the data axes once,
after the sweep (Megatron-LM's vocab-parallel cross-entropy, Shoeybi et al., 2019).

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


@dataclasses.dataclass(frozen=True)
class VocabParallelRun:
    """Sweep the chunks of each device's (token shard, vocab shard) under shard_map."""

    mesh: Mesh
    vocab_axis: str
    data_axis: str | tuple[str, ...] | None

    def __call__(self, plan, h, w_mat, chunk, shared, targets, w, temperature, ce_weight,
                 need_grad):
        d, v = self.data_axis, self.vocab_axis
        chunk_specs = {"dense": (P(d, v),), "head": (P(d, None),)}.get(
            plan.spec.form, (P(d, None), P(d, None)))
        shared_specs = tuple(P(None, v) for _ in shared)
        has_targets = targets is not None

        def body(h, w_mat, chunk, shared, w, temperature, ce_weight, *maybe_targets):
            y = maybe_targets[0] if has_targets else None
            parts, dh, dw = run_chunks(h, w_mat, chunk, shared, y, w, temperature, ce_weight,
                                       spec=plan.spec, chunk_size=plan.chunk_size,
                                       need_grad=need_grad)
            if d is not None:
                parts = jax.lax.psum(parts, d)
                dw = None if dw is None else jax.lax.psum(dw, d)
            return (parts, dh, dw) if need_grad else parts

        in_specs = (P(d, None), P(None, v), chunk_specs, shared_specs, P(d), P(), P())
        args = (h, w_mat, chunk, shared, w, temperature, ce_weight)
        if has_targets:
            in_specs, args = (*in_specs, P(d)), (*args, targets)
        out_specs = (P(), P(d, None), P(None, v)) if need_grad else P()
        fn = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
        out = fn(*args)
        return out if need_grad else (out, None, None)


def _axis_size(mesh: Mesh, axis, name: str) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    for a in names:
        if a not in mesh.shape:
            raise ValueError(f"{name}={a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in names)


def vocab_parallel_distill(hidden, lm_head, teacher, *, mesh: Mesh, vocab_axis: str,
                           data_axis: str | tuple[str, ...] | None = None, chunk_size=None,
                           **kwargs):
    """`fused_distill` with `lm_head` sharded over `vocab_axis` and tokens over `data_axis`.

    Args:
      hidden, lm_head, teacher, and every keyword of `fused_distill` (targets, mask,
        divergence, temperature, ce_weight, logit_softcap, divergence arguments).
      mesh: the device mesh; axis names come from the caller (e.g. kdjax.sharding.TENSOR
        and DATA). Other mesh axes replicate the computation.
      vocab_axis: mesh axis that splits the vocabulary: V must divide by its size.
      data_axis: mesh axis (or tuple of axes) that splits the tokens, or None.
      chunk_size: tokens per chunk on each device (None: auto from the local N, H, V).

    A dense teacher or TeacherHead with a padded vocabulary (V_t > V) is sliced to the
    student's V before sharding (one copy). `adaptive_kl` needs a sort over the whole
    vocabulary per token and raises here; use `fused_distill` for it.

    Returns:
      `(loss, metrics)` exactly as `fused_distill`, equal to the unsharded result.
    """
    n, hdim, v = _args.check_student(hidden, lm_head)
    tp = _axis_size(mesh, vocab_axis, "vocab_axis")
    dp = _axis_size(mesh, data_axis, "data_axis")
    if v % tp:
        raise ValueError(f"vocabulary size V={v} does not divide by the {vocab_axis!r} mesh "
                         f"axis size {tp}; pad lm_head (and the teacher) to a multiple of {tp}")
    if n % dp:
        raise ValueError(f"{n} tokens do not divide by the data-parallel size {dp} "
                         f"(data_axis={data_axis!r}); pad the batch to a multiple of {dp}")
    teacher_form(teacher)  # type check before anything is traced
    _args.check_chunk_size(chunk_size)
    c = chunk_size or auto_chunk_size(n // dp, hdim, v // tp)
    run = VocabParallelRun(mesh=mesh, vocab_axis=vocab_axis, data_axis=data_axis)
    return fused_distill_impl(hidden, lm_head, teacher, run=run, vocab_axis=vocab_axis,
                              chunk_size=c, **kwargs)
