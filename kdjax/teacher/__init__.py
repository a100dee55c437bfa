"""kdjax.teacher: the teacher-signal store and `kdjax precompute` / `kdjax inspect`.

    store = open_teacher_store(path)          # a complete store (else StoreIncompleteError)
    store.check_compatible(token_store, vocab_size=student_vocab)
    fields = store.read(rows)                 # sampled: ids, counts; topk: ids, logprobs;
                                              # dense: logits; + hidden_<layer>
    teacher = teacher_from_batch(batch, store.manifest)   # for kdjax.losses.fused_distill

Names are imported on first use (PEP 562), so `from kdjax.teacher.config import
PrecomputeConfig` (config parsing) imports no JAX.
"""

from kdjax._lazy import lazy_exports

# public name → the submodule that defines it
_EXPORTS = {
    "MODES": "signal",
    "PrecomputeConfig": "config",
    "TeacherStore": "store",
    "dense_signal": "signal",
    "hidden_from_batch": "batch",
    "inspect_store": "inspect",
    "open_teacher_store": "store",
    "precompute": "precompute",
    "sampled_signal": "signal",
    "teacher_from_batch": "batch",
    "topk_signal": "signal",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
