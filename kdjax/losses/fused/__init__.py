"""Fused, chunked and vocab-parallel distillation kernels (no `[N, V]` logits).

- `fused_distill`: student hidden states + lm_head → divergence (+ hard-label CE) with a
  custom VJP, chunked over tokens (see `distill.py`).
- `vocab_parallel_distill`: the same with lm_head sharded over a mesh axis (`parallel.py`).
- `fused_sequence_logprobs`: per-sequence target log-probs for the ranking losses.
"""

from kdjax.losses.fused._scan import auto_chunk_size
from kdjax.losses.fused.distill import fused_distill
from kdjax.losses.fused.parallel import vocab_parallel_distill
from kdjax.losses.fused.sequence import fused_sequence_logprobs
from kdjax.losses.fused.teachers import SampledTeacher, SparseTeacher, TeacherHead

__all__ = [
    "SampledTeacher",
    "SparseTeacher",
    "TeacherHead",
    "auto_chunk_size",
    "fused_distill",
    "fused_sequence_logprobs",
    "vocab_parallel_distill",
]
