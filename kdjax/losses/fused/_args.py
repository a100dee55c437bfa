"""Argument checks and flattening shared by the fused kernels (all at trace time)."""

from __future__ import annotations

import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses.divergences import DIVERGENCES
from kdjax.losses.fused import teachers as _t
from kdjax.losses.fused._chunk import ChunkSpec

F32 = jnp.float32


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None (automatic), "
                         f"got {chunk_size!r}")


def check_softcap(cap, name="logit_softcap") -> float | None:
    if cap is None:
        return None
    c = _checks.concrete_float(cap, name)
    if c is None or not c > 0:
        raise ValueError(f"{name} must be a positive Python float or None, got {cap!r}")
    return c


def check_student(hidden, lm_head) -> tuple[int, int, int]:
    """(N, H, V) after flattening hidden's leading axes."""
    _checks.check_floating(hidden, "hidden")
    _checks.check_floating(lm_head, "lm_head")
    _checks.check_rank_at_least(hidden, 2, "hidden")
    if jnp.ndim(lm_head) != 2:
        raise ValueError(f"lm_head must be [H, V], got shape {jnp.shape(lm_head)}")
    h, v = lm_head.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden has feature size {hidden.shape[-1]} (shape {hidden.shape}) "
                         f"but lm_head is [H={h}, V={v}]; pass lm_head as [H, V] "
                         "(transpose an embedding table [V, H])")
    n = 1
    for d in hidden.shape[:-1]:
        n *= d
    if n == 0:
        raise ValueError(f"hidden has no tokens (shape {hidden.shape}); skip the loss for an "
                         "empty batch instead")
    return n, h, v


def flat_tokens(x, lead, name, *, trailing=0):
    """Checks `x.shape == lead + (trailing dims)` and flattens the `lead` axes."""
    shape = jnp.shape(x)
    k = len(shape) - trailing
    if tuple(shape[:k]) != tuple(lead) or len(shape) != len(lead) + trailing:
        expect = "[" + ", ".join(map(str, lead)) + (", …" * trailing) + "]"
        raise ValueError(f"{name} has shape {shape}; expected {expect} to match hidden's "
                         f"leading (token) axes {tuple(lead)}")
    n = 1
    for d in lead:
        n *= d
    return jnp.reshape(x, (n, *shape[k:]))


def check_divergence(name, form, kwargs) -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {list(DIVERGENCES)}")
    if form in ("sparse", "sampled") and name != "forward_kl":
        raise ValueError(
            f"divergence={name!r} needs the full teacher distribution, but the teacher is a "
            f"{form} teacher (known at its ids only); use divergence='forward_kl' "
            "(sparse_forward_kl / sampled_forward_kl) or a dense/TeacherHead teacher")
    if form in ("sparse", "sampled") and kwargs:
        raise TypeError(f"{form} teachers take no divergence arguments, got {sorted(kwargs)}")


def weights(mask, lead, n):
    """Token weights `[N]` f32 from a bool/float mask of hidden's leading shape."""
    if mask is None:
        return jnp.ones((n,), F32)
    return flat_tokens(jnp.asarray(mask), lead, "mask").astype(F32)


def teacher_arrays(teacher, form, lead, vocab, slice_dense: bool):
    """(per-token arrays, shared arrays, extra spec fields) for a teacher argument."""
    if form == "none":
        return (), (), {}
    if form == "dense":
        _checks.check_floating(teacher, "teacher")
        t = flat_tokens(teacher, lead, "teacher (dense logits)", trailing=1)
        _check_vocab(t.shape[-1], vocab, "teacher logits")
        return ((t[:, :vocab] if slice_dense else t),), (), {}
    if form == "head":
        _checks.check_floating(teacher.hidden, "TeacherHead.hidden")
        _checks.check_floating(teacher.lm_head, "TeacherHead.lm_head")
        ht = flat_tokens(teacher.hidden, lead, "TeacherHead.hidden", trailing=1)
        wt = teacher.lm_head
        if jnp.ndim(wt) != 2 or wt.shape[0] != ht.shape[-1]:
            raise ValueError(f"TeacherHead.lm_head must be [H_t={ht.shape[-1]}, V_t], got "
                             f"shape {jnp.shape(wt)}")
        _check_vocab(wt.shape[1], vocab, "TeacherHead.lm_head")
        cap = check_softcap(teacher.logit_softcap, "TeacherHead.logit_softcap")
        return (ht,), (wt[:, :vocab],), {"teacher_softcap": cap}
    ids, data = (teacher.ids, teacher.logprobs if form == "sparse" else teacher.counts)
    _checks.check_integer(ids, f"{type(teacher).__name__}.ids")
    # Stores keep ids in the smallest unsigned dtype (uint16/uint32); index in int32.
    ids = flat_tokens(ids, lead, f"{type(teacher).__name__}.ids", trailing=1).astype(jnp.int32)
    name = "logprobs" if form == "sparse" else "counts"
    data = flat_tokens(data, lead, f"{type(teacher).__name__}.{name}", trailing=1)
    if data.shape != ids.shape:
        raise ValueError(f"{type(teacher).__name__}.{name} has shape {data.shape} but ids has "
                         f"{ids.shape} (after flattening the token axes); they must match")
    if form == "sparse":
        _checks.check_floating(data, "SparseTeacher.logprobs")
        if teacher.tail not in _t.SPARSE_TAILS:
            raise ValueError(f"SparseTeacher.tail must be one of {_t.SPARSE_TAILS}, "
                             f"got {teacher.tail!r}")
        return (ids, data), (), {"tail": teacher.tail}
    _checks.check_integer(data, "SampledTeacher.counts")
    ns = teacher.num_samples
    if isinstance(ns, bool) or not isinstance(ns, int) or ns <= 0:
        raise ValueError(f"SampledTeacher.num_samples must be a positive int, got {ns!r}")
    return (ids, data), (), {"num_samples": ns}


def _check_vocab(v_teacher, v_student, name):
    if v_teacher < v_student:
        raise ValueError(
            f"{name} has vocabulary size {v_teacher}, smaller than the student's {v_student} "
            "(lm_head columns). A teacher may have a larger (padded) vocabulary, whose extra "
            "columns are masked; a smaller one cannot be padded safely — slice the student's "
            "lm_head to the shared vocabulary or pad the teacher with -inf logits.")


def make_spec(*, divergence, kwargs, form, vocab, extra, softcap, targets, ce_weight,
              temperature, vocab_axis=None, with_top1=False) -> ChunkSpec:
    ce_w = _checks.concrete_float(ce_weight, "ce_weight")
    if targets is None and (ce_w is None or ce_w != 0.0):
        raise ValueError(f"ce_weight={ce_weight!r} needs targets (the hard labels, [N] int); "
                         "pass targets=... or ce_weight=0.0")
    t = _checks.concrete_float(temperature, "temperature")
    return ChunkSpec(
        divergence=divergence, kwargs=tuple(sorted(kwargs.items())), form=form,
        vocab_size=vocab, softcap=softcap, with_ce=targets is not None,
        ce_in_grad=targets is not None and ce_w != 0.0, temperature_is_one=t == 1.0,
        vocab_axis=vocab_axis, with_top1=with_top1, **extra)
