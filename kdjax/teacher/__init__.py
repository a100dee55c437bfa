"""kdjax.teacher: the teacher-signal store and `kdjax precompute` / `kdjax inspect`.

    store = open_teacher_store(path)          # a complete store (else StoreIncompleteError)
    store.check_compatible(token_store, vocab_size=student_vocab)
    fields = store.read(rows)                 # sampled: ids, counts; topk: ids, logprobs;
                                              # dense: logits; + hidden_<layer>
    teacher = teacher_from_batch(batch, store.manifest)   # for kdjax.losses.fused_distill
"""

from kdjax.teacher.batch import hidden_from_batch, teacher_from_batch
from kdjax.teacher.config import PrecomputeConfig
from kdjax.teacher.inspect import inspect_store
from kdjax.teacher.precompute import precompute
from kdjax.teacher.signal import MODES, dense_signal, sampled_signal, topk_signal
from kdjax.teacher.store import TeacherStore, open_teacher_store

__all__ = [
    "MODES",
    "PrecomputeConfig",
    "TeacherStore",
    "dense_signal",
    "hidden_from_batch",
    "inspect_store",
    "open_teacher_store",
    "precompute",
    "sampled_signal",
    "teacher_from_batch",
    "topk_signal",
]
