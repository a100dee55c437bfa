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
shard_map returns the loss parts and both gradients, the backward pass scales them
(`distill.py`; the shard_map itself is `kernel.sweep` with `MeshAxes`).
"""

from __future__ import annotations

from jax.sharding import Mesh

from kdjax.losses.fused.distill import check_chunk_size, check_student, fused_distill_over
from kdjax.losses.fused.kernel import Axes, MeshAxes, axis_names
from kdjax.losses.fused.teachers import as_teacher


def axis_size(mesh: Mesh, axis: Axes, name: str) -> int:
    for a in axis_names(axis):
        if a not in mesh.shape:
            raise ValueError(f"{name}={a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return MeshAxes(mesh).size(axis)


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
                          targets=None, mask=None, divergence="forward_kl", temperature=1.0,
                          ce_weight=0.0, kd_weight=1.0, chunk_size=None, logit_softcap=None,
                          with_top1=False, grad_mode="forward", **divergence_kwargs):
    """`fused_distill` with tokens split over `data_axis` and, optionally, the vocabulary
    over `vocab_axis`: each device runs the fused loss on its own tokens only.

    Args:
      hidden, lm_head, teacher (any form, or None for CE only), and every keyword of
        `fused_distill` (targets, mask, divergence, temperature, ce_weight, kd_weight,
        logit_softcap, with_top1, grad_mode, divergence arguments).
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
    n, hdim, v = check_student(hidden, lm_head)
    as_teacher(teacher)  # type check before anything is traced
    check_chunk_size(chunk_size)
    check_mesh_split(mesh, n, hdim, v, data_axis=data_axis, vocab_axis=vocab_axis,
                     grad_scatter_axis=grad_scatter_axis)
    mesh_axes = MeshAxes(mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis,
                         grad_scatter_axis=grad_scatter_axis)
    return fused_distill_over(
        mesh_axes, hidden, lm_head, teacher, targets=targets, mask=mask,
        divergence=divergence, temperature=temperature, ce_weight=ce_weight,
        kd_weight=kd_weight, chunk_size=chunk_size, logit_softcap=logit_softcap,
        with_top1=with_top1, grad_mode=grad_mode, divergence_kwargs=divergence_kwargs)


def vocab_parallel_distill(hidden, lm_head, teacher, *, mesh: Mesh, vocab_axis: str,
                           data_axis: Axes = None, **kwargs):
    """`sharded_fused_distill` with `lm_head` sharded over `vocab_axis` (required) and
    tokens over `data_axis` (or replicated); the other keywords are `fused_distill`'s.
    Equal to the unsharded `fused_distill`."""
    axis_size(mesh, vocab_axis, "vocab_axis")
    return sharded_fused_distill(hidden, lm_head, teacher, mesh=mesh, data_axis=data_axis,
                                 vocab_axis=vocab_axis, **kwargs)
