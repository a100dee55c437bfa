"""Batched, sharded teacher forwards for `kdjax score`: per-sequence log-probs and the
judge's grade log-probs.

Sequences are laid out whole in rows `[B, L]` (right-padded, padding in segment 0), grouped
by length bucket and run `batch_size` rows at a time, so each (batch, bucket) shape compiles
once; a short last batch repeats its last row. Rows are split over the mesh's batch axes
(`kdjax.sharding`: data × fsdp) and each device runs the decoder and the fused
log-prob kernel (`fused_sequence_logprobs`, no `[N, V]` logits) on its own rows; only the
per-row results are gathered. A row's result depends only on the row, never on the rows
beside it (up to float rounding when the per-device batch changes the matmul shapes).

Every process runs the same batches (the model is sharded over the global mesh), so each
gets every result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from kdjax.sharding import data_parallel_size, fused_loss_axes, logical_to_spec


def default_buckets(width: int, buckets: Sequence[int] | None = None) -> list[int]:
    """Length buckets: `buckets` (those ≥ `width` beyond the first dropped), else powers of
    two from 16; the last one holds `width`."""
    if buckets is None:
        out, b = [], 16
        while b < width:
            out.append(b)
            b *= 2
        return [*out, b]
    out = [b for b in buckets if b < width]
    return [*out, next((b for b in buckets if b >= width), width)]


@dataclasses.dataclass
class Scorer:
    """A model's batched forwards over a mesh.

    Args:
      model: a `kdjax.models.Decoder` (placed on `mesh`).
      mesh: its mesh; rows are split over its batch axes.
      batch_size: rows per forward (rounded up to a multiple of the data-parallel size).
      buckets: the sequence-length buckets (increasing; the last holds every sequence).
      pad_id: the id of padding tokens (never attended).
    """

    model: object
    mesh: jax.sharding.Mesh
    batch_size: int
    buckets: Sequence[int]
    pad_id: int = 0

    def __post_init__(self):
        dp = data_parallel_size(self.mesh)
        self.rows = -(-self.batch_size // dp) * dp
        self.graphdef, self.state = nnx.split(self.model)
        spec = logical_to_spec(("batch",), mesh=self.mesh)
        self.row_sharding = NamedSharding(self.mesh, spec)
        self.matrix_sharding = NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec, None))

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          completions: Sequence[Sequence[int]],
                          on_batch: Callable[[int, int], None] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(Σ_t log p(c_t | prompt, c_<t) `[N]` f32, completion lengths `[N]` int32) of
        each (prompt, completion) pair; the completion's every token counts."""
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        starts = np.asarray([len(p) for p in prompts], np.int64)
        counts = np.asarray([len(c) for c in completions], np.int32)
        fn = self._logprob_fn()

        def run(idx, width):
            tokens, segments = self._layout([seqs[i] for i in idx], width)
            targets = np.zeros_like(tokens)
            targets[:, :-1] = tokens[:, 1:]
            t = np.arange(width)[None, :]
            ends = (starts[idx] + counts[idx])[:, None]
            mask = (t >= starts[idx][:, None] - 1) & (t < ends - 1)
            return fn(self.state, *self._place(tokens, segments, targets, mask))

        sums = self._run(seqs, run, on_batch)
        return sums.astype(np.float32), counts

    def grade_logprobs(self, requests: Sequence[Sequence[int]], grade_ids: Sequence[int],
                       on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        """`[N, G]` f32 log-probs (full-vocabulary softmax) of the grade tokens as the next
        token after each request."""
        fn = _grade_fn(self.graphdef, self.row_sharding)
        grade_ids = jnp.asarray(grade_ids, jnp.int32)

        def run(idx, width):
            tokens, segments = self._layout([requests[i] for i in idx], width)
            last = np.asarray([len(requests[i]) - 1 for i in idx], np.int32)
            return fn(self.state, *self._place(tokens, segments), self._place_rows(last),
                      grade_ids)

        return self._run(requests, run, on_batch).astype(np.float32)

    def lower(self, kind: str, width: int, num_grades: int = 9):
        """The lowered forward of one batch of sequences of `width` tokens (`kind`:
        "logprobs" or "grades"), for ahead-of-time inspection: memory, FLOPs, collectives."""
        tokens = np.zeros((self.rows, width), np.int32)
        segments = np.ones((self.rows, width), np.int32)
        if kind == "logprobs":
            fn, args = self._logprob_fn(), self._place(tokens, segments, tokens,
                                                       segments.astype(bool))
        elif kind == "grades":
            fn = _grade_fn(self.graphdef, self.row_sharding)
            last = self._place_rows(np.full(self.rows, width - 1, np.int32))
            args = (*self._place(tokens, segments), last, jnp.arange(num_grades))
        else:
            raise ValueError(f"kind {kind!r} is not one of ['logprobs', 'grades']")
        with jax.set_mesh(self.mesh):
            return fn.lower(self.state, *args)

    def _logprob_fn(self):
        cfg = self.model.config
        axes = fused_loss_axes(self.mesh, cfg.hidden_size, cfg.vocab_size)
        return _logprob_fn(self.graphdef, self.mesh, axes["data_axis"], axes["vocab_axis"],
                           self.row_sharding)

    # ------------------------------------------------------------------ batching

    def _run(self, seqs, run, on_batch) -> np.ndarray:
        """`run(row indices [rows], bucket width)` over every batch; results in input order."""
        lengths = np.asarray([len(s) for s in seqs], np.int64)
        if len(seqs) and lengths.max() > self.buckets[-1]:
            raise ValueError(f"a sequence of {lengths.max()} tokens is longer than the "
                             f"largest bucket {self.buckets[-1]}; add a larger bucket")
        bucket = np.searchsorted(np.asarray(self.buckets), lengths)
        out = None
        for b, width in enumerate(self.buckets):
            rows = np.flatnonzero(bucket == b)
            for start in range(0, len(rows), self.rows):
                chunk = rows[start:start + self.rows]
                real = len(chunk)
                idx = np.concatenate([chunk, np.repeat(chunk[-1:], self.rows - real)])
                with jax.set_mesh(self.mesh):
                    res = _gathered(run(idx, int(width)))[:real]
                if out is None:
                    out = np.zeros((len(seqs), *res.shape[1:]), np.float64)
                out[chunk] = res
                if on_batch is not None:
                    on_batch(real, int(lengths[chunk].sum()))
        return np.zeros((0,)) if out is None else out

    def _layout(self, seqs, width: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((len(seqs), width), self.pad_id, np.int32)
        segments = np.zeros((len(seqs), width), np.int32)
        for r, s in enumerate(seqs):
            tokens[r, :len(s)] = s
            segments[r, :len(s)] = 1
        return tokens, segments

    def _place(self, *arrays):
        """Host `[B, L]` arrays (whole on every process) as global arrays split by rows."""
        return tuple(jax.make_array_from_callback(a.shape, self.matrix_sharding,
                                                  lambda index, a=a: a[index])
                     for a in arrays)

    def _place_rows(self, a: np.ndarray):
        return jax.make_array_from_callback(a.shape, self.row_sharding, lambda index: a[index])


def _gathered(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=8)
def _logprob_fn(graphdef, mesh, data_axis, vocab_axis, row_sharding):
    from kdjax.losses.fused.sequence import fused_sequence_logprobs

    def fn(state, tokens, segments, targets, mask):
        model = nnx.merge(graphdef, state)
        hidden = model(tokens, segment_ids=segments, return_logits=False).hidden
        if data_axis is None and vocab_axis is None:
            return fused_sequence_logprobs(hidden, model.lm_head(), targets, mask)
        return fused_sequence_logprobs(hidden, model.lm_head(), targets, mask, mesh=mesh,
                                       data_axis=data_axis, vocab_axis=vocab_axis)

    return jax.jit(fn, out_shardings=row_sharding)


@functools.lru_cache(maxsize=8)
def _grade_fn(graphdef, row_sharding):
    def fn(state, tokens, segments, last, grade_ids):
        model = nnx.merge(graphdef, state)
        hidden = model(tokens, segment_ids=segments, return_logits=False).hidden
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, H]
        logits = jnp.dot(h, model.lm_head(), preferred_element_type=jnp.float32)  # [B, V]
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take(logits, grade_ids, axis=1) - lse

    return jax.jit(fn, out_shardings=NamedSharding(
        row_sharding.mesh, jax.sharding.PartitionSpec(*row_sharding.spec, None)))
