"""Fused, chunked and vocab-parallel distillation kernels (no `[N, V]` logits).

- `fused_distill`: student hidden states + lm_head → divergence (+ hard-label CE) with a
  custom VJP, chunked over tokens (`distill.py`; one chunk and the sweep: `kernel.py`).
- `sharded_fused_distill`: the same over a mesh, each device on its own tokens, the
  vocabulary optionally split over an axis (`parallel.py`); `vocab_parallel_distill`
  is its vocab-split form.
- `fused_sequence_logprobs`: per-sequence target log-probs for the ranking losses (on one
  device or, with `mesh=`, over a mesh).
- Teacher forms (`teachers.py`): `DenseTeacher`, `SparseTeacher`, `SampledTeacher`,
  `TeacherHead`, or None for the hard-label CE alone.
"""

from kdjax.losses.fused.distill import fused_distill
from kdjax.losses.fused.kernel import auto_chunk_size
from kdjax.losses.fused.parallel import sharded_fused_distill, vocab_parallel_distill
from kdjax.losses.fused.sequence import fused_sequence_logprobs
from kdjax.losses.fused.teachers import DenseTeacher, SampledTeacher, SparseTeacher, TeacherHead

__all__ = [
    "DenseTeacher",
    "SampledTeacher",
    "SparseTeacher",
    "TeacherHead",
    "auto_chunk_size",
    "fused_distill",
    "fused_sequence_logprobs",
    "sharded_fused_distill",
    "vocab_parallel_distill",
]
