"""Teacher forms accepted by the fused kernels (pytrees; static fields in `meta`).

`fused_distill` takes the teacher as one of:

- dense logits `[N, V_t]` (a plain array), streamed chunk by chunk;
- `SparseTeacher(ids, logprobs, tail)`: top-k ids and log-probs from a teacher store;
- `SampledTeacher(ids, counts, num_samples)`: ids drawn from the teacher and their counts;
- `TeacherHead(hidden, lm_head)`: the online teacher's final hidden states and head, whose
  logits are computed chunk by chunk (never materialized) and are under stop_gradient.

A teacher vocabulary larger than the student's (padded embedding tables) is allowed for
the dense and head forms: the columns beyond the student's V are masked out of the
teacher softmax, never zero-padded into it.
"""

from __future__ import annotations

import dataclasses

import jax

Array = jax.Array

SPARSE_TAILS = ("renormalize", "bucket")


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseTeacher:
    """Top-k teacher: `ids [N, K]` int, `logprobs [N, K]` float (stored temperature).

    `tail="renormalize"` renormalizes p over the ids; `"bucket"` adds the residual mass
    as one extra bucket (see `kdjax.losses.sparse_forward_kl`).
    """

    ids: Array
    logprobs: Array
    tail: str = _static("renormalize")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampledTeacher:
    """Sampled teacher: `ids [N, U]` int, `counts [N, U]` int of `num_samples` draws.

    t̂ = counts / num_samples; slots with count 0 are ignored (Anshumann et al., 2025).
    """

    ids: Array
    counts: Array
    num_samples: int = _static()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherHead:
    """Online teacher: final hidden `[N, H_t]` and `lm_head [H_t, V_t]` (V_t ≥ student V).

    `logit_softcap` (static, optional) soft-caps the teacher logits, cap·tanh(logits/cap),
    for teachers such as Gemma 2. The teacher receives no gradient (stop_gradient).
    """

    hidden: Array
    lm_head: Array
    logit_softcap: float | None = _static(None)


def teacher_form(teacher) -> str:
    """"dense" | "sparse" | "sampled" | "head" | "none" (teacher=None: CE only) for a
    teacher argument (TypeError otherwise)."""
    if teacher is None:
        return "none"
    if isinstance(teacher, SparseTeacher):
        return "sparse"
    if isinstance(teacher, SampledTeacher):
        return "sampled"
    if isinstance(teacher, TeacherHead):
        return "head"
    if hasattr(teacher, "shape") and hasattr(teacher, "dtype"):
        return "dense"
    raise TypeError(
        f"teacher must be dense logits [N, V_t], SparseTeacher, SampledTeacher, TeacherHead "
        f"or None (hard-label CE only); "
        f"got {type(teacher).__name__}"
    )
