"""The custom VJP shared by the single-device and vocab-parallel fused losses.

`grad_mode="forward"` (default, Liger-Kernel style): the forward pass computes the loss
and the gradients of `hidden` and `lm_head` in one sweep over the chunks, keeping only
`dh [N, H]` and the f32 `dW [H, V]` as residuals; the backward pass scales them by the
incoming cotangent. The matmuls cost 6·N·H·V FLOPs in all.
`grad_mode="recompute"`: the forward pass computes only the loss (2·N·H·V) and the
backward pass sweeps again with gradients (6·N·H·V); residuals are just the inputs.
Both return the gradient of the loss `Σ w (kd_weight·D + ce_weight·CE)`; the separate D
and CE sums are returned for logging only (no gradient). `weights` is the f32 pair
`[kd_weight, ce_weight]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from kdjax.losses.fused._chunk import ChunkSpec


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static plan: what to compute (`spec`) and how to sweep it (`run`)."""

    spec: ChunkSpec
    chunk_size: int
    grad_mode: str
    # run(plan, h, W, chunk, shared, targets, w, T, ce_w, need_grad) -> (parts, dh, dW);
    # a hashable object (frozen dataclass), since the plan is a static argument.
    run: Callable


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_core(plan: Plan, h, w_mat, chunk, shared, targets, w, temperature, weights):
    """`(total, parts)`: total = weights[0]·parts[0] + weights[1]·parts[1] (only total has
    a gradient)."""
    parts, _, _ = plan.run(plan, h, w_mat, chunk, shared, targets, w, temperature, weights,
                           False)
    return _total(parts, plan, weights), parts


def _total(parts, plan, weights):
    total = weights[0] * parts[0] if plan.spec.form != "none" else jnp.zeros((), jnp.float32)
    if plan.spec.ce_in_grad:
        total = total + weights[1] * parts[1]
    return total


def _fwd(plan, h, w_mat, chunk, shared, targets, w, temperature, weights):
    args = (h, w_mat, chunk, shared, targets, w, temperature, weights)
    if plan.grad_mode == "forward":
        parts, dh, dw = plan.run(plan, *args, True)
        res = (dh, dw, args)
    else:
        parts, _, _ = plan.run(plan, *args, False)
        res = (None, None, args)
    return (_total(parts, plan, weights), parts), res


def _bwd(plan, res, cotangents):
    g, _ = cotangents  # the parts are for logging; see the module docstring
    dh, dw, args = res
    h, w_mat = args[0], args[1]
    if dh is None:
        _, dh, dw = plan.run(plan, *args, True)
    g = g.astype(jnp.float32)
    dh = (g * dh.astype(jnp.float32)).astype(h.dtype)
    dw = (g * dw).astype(w_mat.dtype)
    # None = zero cotangent, never materialized (a dense teacher is [N, V]); the teacher
    # is under stop_gradient and the rest are integer or weight arguments.
    return (dh, dw, *(None for _ in args[2:]))


fused_core.defvjp(_fwd, _bwd)
