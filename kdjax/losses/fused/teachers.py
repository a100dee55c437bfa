"""Teacher forms accepted by the fused kernels (registered pytree dataclasses).

`fused_distill` takes the teacher as one of:

- `DenseTeacher(logits)`: dense logits `[N, V_t]`, streamed chunk by chunk (a plain array
  is accepted and wrapped);
- `SparseTeacher(ids, logprobs, tail)`: top-k ids and log-probs from a teacher store;
- `SampledTeacher(ids, counts, num_samples)`: ids drawn from the teacher and their counts;
- `TeacherHead(hidden, lm_head, logit_softcap)`: the online teacher's final hidden states
  and head, whose logits are computed chunk by chunk (never materialized) and are under
  stop_gradient;
- None: no teacher, only the hard-label CE (`NoTeacher` inside the kernel).

Each form owns what differs between forms, so the kernel never asks which one it has:

- `flatten(lead, vocab_size, sharded_vocab=)` checks its arrays and flattens hidden's
  token axes `lead` into one, `[N, ...]`;
- `map_rows(fn)` applies `fn` to its per-token arrays (the sweep slices a chunk with it,
  and they are split over the data axis); whole arrays (`TeacherHead.lm_head`) stay;
- `partition_specs(data_axis, vocab_axis)` is the form with a PartitionSpec per array;
- `terms(logq, token_weights, temperature, spec, need_grad)` is the chunk's divergence:
  `(values [C], g [C, V_local] | None, top1 [C] int32 | None)`, where
  `g = Σ_c w_c ∂values_c/∂logq` is the gradient with respect to the student's (tempered)
  log-probs, holding the student logsumexp fixed (the kernel adds the softmax part), and
  top1 is the teacher's most likely id (only with `spec.with_top1`).

The formulas are the catalog's: dense and head teachers call
`divergences.pointwise_terms` / `from_logprobs`; the sparse and sampled teachers use the
`sparse_forward_kl` / `sampled_forward_kl` definitions (`sparse.*_gathered`) on the
student log-probs gathered at the teacher's ids. The bucket tail's student mass q_r is
log1mexp(logsumexp(log q_ids)) (the gathered default), not the dense kernel's exact
complement sum: equal until Σ q_ids rounds to 1.

A teacher vocabulary larger than the student's (padded embedding tables) is allowed for
the dense and head forms: the columns beyond the student's V are masked out of the
teacher softmax, never zero-padded into it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from kdjax.losses import _checks, divergences, sparse
from kdjax.losses.fused import vocab

Array = jax.Array
F32 = jnp.float32

SPARSE_TAILS = ("renormalize", "bucket")


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


def _value_and_grad(fn, x, token_weights, need_grad, axis):
    """(psum'd fn(x) [C], Σ_c w_c ∂fn(x)_c/∂x or None)."""
    if not need_grad:
        return vocab.psum(fn(x), axis), None
    local, vjp = jax.vjp(fn, x)
    (g,) = vjp(token_weights.astype(local.dtype))
    return vocab.psum(local, axis), g


def _check_vocab(v_teacher, v_student, name):
    if v_teacher < v_student:
        raise ValueError(
            f"{name} has vocabulary size {v_teacher}, smaller than the student's {v_student} "
            "(lm_head columns). A teacher may have a larger (padded) vocabulary, whose extra "
            "columns are masked; a smaller one cannot be padded safely — slice the student's "
            "lm_head to the shared vocabulary or pad the teacher with -inf logits.")


class _FullDistribution:
    """Dense and head teachers: the whole teacher distribution is known in each chunk,
    so every divergence of the catalog applies."""

    def check_divergence(self, name, kwargs) -> None:
        del name, kwargs

    def terms(self, logq, token_weights, temperature, spec, need_grad):
        t = lax.stop_gradient(self.logits_of_chunk(logq.shape[-1]))
        if not spec.temperature_is_one:
            t = t / temperature
        logp = t - vocab.logsumexp(t, spec.vocab_axis)[:, None]
        kw = dict(spec.divergence_kwargs)
        if spec.divergence == "adaptive_kl":  # needs the whole row; never vocab-sharded
            fn = lambda lq: divergences.from_logprobs("adaptive_kl", logp, lq, **kw)
        else:
            fn = lambda lq: jnp.sum(
                divergences.pointwise_terms(spec.divergence, logp, lq, **kw), axis=-1)
        values, g = _value_and_grad(fn, logq, token_weights, need_grad, spec.vocab_axis)
        top1 = vocab.argmax(logp, spec.vocab_axis) if spec.with_top1 else None
        return values, g, top1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseTeacher(_FullDistribution):
    """Dense teacher logits `[N, V_t]` (V_t ≥ the student's V; columns ≥ V are masked)."""

    logits: Array

    def flatten(self, lead, vocab_size, *, sharded_vocab: bool) -> DenseTeacher:
        _checks.check_floating(self.logits, "teacher")
        t = _checks.flat_tokens(self.logits, lead, "teacher (dense logits)", trailing=1)
        _check_vocab(t.shape[-1], vocab_size, "teacher logits")
        # Split over a vocab axis, the columns must line up with lm_head's shards; on one
        # device each chunk is sliced instead (no [N, V] copy of a padded teacher).
        return DenseTeacher(t[:, :vocab_size] if sharded_vocab else t)

    def map_rows(self, fn) -> DenseTeacher:
        return DenseTeacher(fn(self.logits))

    def partition_specs(self, data_axis, vocab_axis) -> DenseTeacher:
        return DenseTeacher(P(data_axis, vocab_axis))

    def logits_of_chunk(self, v_local: int) -> Array:
        return self.logits[:, :v_local].astype(F32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TeacherHead(_FullDistribution):
    """Online teacher: final hidden `[N, H_t]` and `lm_head [H_t, V_t]` (V_t ≥ student V).

    `logit_softcap` (static, optional) soft-caps the teacher logits, cap·tanh(logits/cap),
    for teachers such as Gemma 2. The teacher receives no gradient (stop_gradient).
    """

    hidden: Array
    lm_head: Array
    logit_softcap: float | None = _static(None)

    def flatten(self, lead, vocab_size, *, sharded_vocab: bool) -> TeacherHead:
        del sharded_vocab  # lm_head is sliced to the student's V either way ([H_t, V])
        _checks.check_floating(self.hidden, "TeacherHead.hidden")
        _checks.check_floating(self.lm_head, "TeacherHead.lm_head")
        ht = _checks.flat_tokens(self.hidden, lead, "TeacherHead.hidden", trailing=1)
        wt = self.lm_head
        if jnp.ndim(wt) != 2 or wt.shape[0] != ht.shape[-1]:
            raise ValueError(f"TeacherHead.lm_head must be [H_t={ht.shape[-1]}, V_t], got "
                             f"shape {jnp.shape(wt)}")
        _check_vocab(wt.shape[1], vocab_size, "TeacherHead.lm_head")
        cap = _checks.positive_float_or_none(self.logit_softcap, "TeacherHead.logit_softcap")
        return TeacherHead(ht, wt[:, :vocab_size], cap)

    def map_rows(self, fn) -> TeacherHead:
        return dataclasses.replace(self, hidden=fn(self.hidden))

    def partition_specs(self, data_axis, vocab_axis) -> TeacherHead:
        return dataclasses.replace(self, hidden=P(data_axis, None), lm_head=P(None, vocab_axis))

    def logits_of_chunk(self, v_local: int) -> Array:
        del v_local  # lm_head holds exactly this shard's columns
        t = jnp.dot(self.hidden, self.lm_head, preferred_element_type=F32)
        return vocab.softcap(t, self.logit_softcap)[0]


class _Gathered:
    """Sparse and sampled teachers: known at their ids only, so D is the forward KL there,
    computed from the student log-probs gathered at the ids (`_kl_at_ids`). The stored
    signal is already at the objective's temperature; only the student is tempered."""

    def check_divergence(self, name, kwargs) -> None:
        kind = type(self).__name__
        if name != "forward_kl":
            raise ValueError(
                f"divergence={name!r} needs the full teacher distribution, but the teacher is "
                f"a {kind} (known at its ids only); use divergence='forward_kl' "
                "(sparse_forward_kl / sampled_forward_kl) or a dense/TeacherHead teacher")
        if kwargs:
            raise TypeError(f"{kind} takes no divergence arguments, got {sorted(kwargs)}")

    def _flat_ids_and(self, stats, stats_name, lead):
        kind = type(self).__name__
        _checks.check_integer(self.ids, f"{kind}.ids")
        # Stores keep ids in the smallest unsigned dtype (uint16/uint32); index in int32.
        ids = _checks.flat_tokens(self.ids, lead, f"{kind}.ids", trailing=1).astype(jnp.int32)
        stats = _checks.flat_tokens(stats, lead, f"{kind}.{stats_name}", trailing=1)
        if stats.shape != ids.shape:
            raise ValueError(f"{kind}.{stats_name} has shape {stats.shape} but ids has "
                             f"{ids.shape} (after flattening the token axes); they must match")
        return ids, stats

    def partition_specs(self, data_axis, vocab_axis):
        del vocab_axis  # global ids: every vocab shard sees all of them
        return self.map_rows(lambda _: P(data_axis, None))

    def terms(self, logq, token_weights, temperature, spec, need_grad):
        del temperature
        logq_ids = vocab.take(logq, self.ids, spec.vocab_axis)
        # The gathered formulas take (z_ids, lse); passing (log q_ids, 0) is the same thing.
        zero = jnp.zeros(logq_ids.shape[:-1], F32)
        values, g_ids = _value_and_grad(lambda lq: self._kl_at_ids(lq, zero), logq_ids,
                                        token_weights, need_grad, None)
        g = None if g_ids is None else vocab.scatter(g_ids, self.ids, logq.shape[-1],
                                                     spec.vocab_axis)
        top1 = None
        if spec.with_top1:  # the largest stored log-prob / count; ties to the first slot
            pick = jnp.argmax(self._stats(), axis=-1)[:, None]
            top1 = jnp.take_along_axis(self.ids, pick, axis=-1)[:, 0]
        return values, g, top1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseTeacher(_Gathered):
    """Top-k teacher: `ids [N, K]` int, `logprobs [N, K]` float (stored temperature).

    `tail="renormalize"` renormalizes p over the ids; `"bucket"` adds the residual mass
    as one extra bucket (see `kdjax.losses.sparse_forward_kl`).
    """

    ids: Array
    logprobs: Array
    tail: str = _static("renormalize")

    def flatten(self, lead, vocab_size, *, sharded_vocab: bool) -> SparseTeacher:
        del vocab_size, sharded_vocab
        ids, logprobs = self._flat_ids_and(self.logprobs, "logprobs", lead)
        _checks.check_floating(logprobs, "SparseTeacher.logprobs")
        if self.tail not in SPARSE_TAILS:
            raise ValueError(f"SparseTeacher.tail must be one of {SPARSE_TAILS}, "
                             f"got {self.tail!r}")
        return SparseTeacher(ids, logprobs, self.tail)

    def map_rows(self, fn) -> SparseTeacher:
        return SparseTeacher(fn(self.ids), fn(self.logprobs), self.tail)

    def _stats(self) -> Array:
        return self.logprobs

    def _kl_at_ids(self, logq_ids, lse):
        return sparse.sparse_forward_kl_gathered(logq_ids, lse, self.logprobs, tail=self.tail)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampledTeacher(_Gathered):
    """Sampled teacher: `ids [N, U]` int, `counts [N, U]` int of `num_samples` draws.

    t̂ = counts / num_samples; slots with count 0 are ignored (Anshumann et al., 2025).
    """

    ids: Array
    counts: Array
    num_samples: int = _static()

    def flatten(self, lead, vocab_size, *, sharded_vocab: bool) -> SampledTeacher:
        del vocab_size, sharded_vocab
        ids, counts = self._flat_ids_and(self.counts, "counts", lead)
        _checks.check_integer(counts, "SampledTeacher.counts")
        ns = self.num_samples
        if isinstance(ns, bool) or not isinstance(ns, int) or ns <= 0:
            raise ValueError(f"SampledTeacher.num_samples must be a positive int, got {ns!r}")
        return SampledTeacher(ids, counts, ns)

    def map_rows(self, fn) -> SampledTeacher:
        return SampledTeacher(fn(self.ids), fn(self.counts), self.num_samples)

    def _stats(self) -> Array:
        return self.counts

    def _kl_at_ids(self, logq_ids, lse):
        return sparse.sampled_forward_kl_gathered(logq_ids, lse, self.counts,
                                                  num_samples=self.num_samples)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoTeacher:
    """teacher=None: no divergence (D = 0), only the hard-label CE."""

    def check_divergence(self, name, kwargs) -> None:
        del name, kwargs

    def flatten(self, lead, vocab_size, *, sharded_vocab: bool) -> NoTeacher:
        del lead, vocab_size, sharded_vocab
        return self

    def map_rows(self, fn) -> NoTeacher:
        del fn
        return self

    def partition_specs(self, data_axis, vocab_axis) -> NoTeacher:
        del data_axis, vocab_axis
        return self

    def terms(self, logq, token_weights, temperature, spec, need_grad):
        del logq, temperature, spec, need_grad
        return jnp.zeros(token_weights.shape, F32), None, None


FORMS = (DenseTeacher, SparseTeacher, SampledTeacher, TeacherHead, NoTeacher)


def as_teacher(teacher):
    """The teacher argument as one of `FORMS`: a plain array becomes `DenseTeacher`, None
    becomes `NoTeacher` (TypeError for anything else)."""
    if teacher is None:
        return NoTeacher()
    if isinstance(teacher, FORMS):
        return teacher
    if hasattr(teacher, "shape") and hasattr(teacher, "dtype"):
        return DenseTeacher(teacher)
    raise TypeError(
        "teacher must be dense logits [N, V_t] (or DenseTeacher), SparseTeacher, "
        "SampledTeacher, TeacherHead or None (hard-label CE only); "
        f"got {type(teacher).__name__}")
