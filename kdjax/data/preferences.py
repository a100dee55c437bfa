"""Preference stores: one prompt per row with K scored candidate completions.

What the `ranking` objective reads (`kdjax.train.ranking`): row i holds `prompt [P]`
(left-aligned, right-padded with `pad_id`) and `prompt_len`, `candidates [K, C]` (each
right-padded) with `candidate_len [K]`, `scores [K]` f32 (higher is better), `valid [K]`
(False: a padding slot), optionally `ref_logps [K]` f32 (the frozen reference's summed
log-probs of each whole candidate given the prompt), and `example_id` (the example's
index in the input order). Valid candidates come first, in their input order.

Every array is int32, f32 or bool, so the step-indexed `kdjax.data.Loader` serves rows
unchanged (it builds jax arrays with x64 off). Rows are kept on the RowStore machinery
(`kdjax.storage`): record layout, crc32c chunks, a ledger and an atomic manifest that
records the tokenizer fingerprint, the reference's fingerprint and what was dropped.

Selection, all counted in the manifest: an empty prompt drops the example; a prompt over
P tokens keeps its last P (`truncate="left"`) or drops the example (`"drop"`); an empty
candidate is dropped; a candidate over C tokens is dropped (`candidate_truncate="drop"`)
or keeps its first C (`"right"`); more than K candidates keep the K best-scored (ties by
input order). With stored reference log-probs no truncation is allowed (the log-probs
belong to the whole sequence): such prompts and candidates are dropped instead. An
example left with fewer than 2 candidates is skipped, and so is one whose candidates all
score the same when `skip_tied` (pairwise and ranking losses learn nothing from it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdjax.data.tokenize import tokenizer_fingerprint
from kdjax.distributed import primary_writes
from kdjax.storage import (
    RowStore,
    RowStoreWriter,
    StoreMismatchError,
    fingerprint_bytes,
    fingerprint_json,
)

KIND = "kdjax.preference_store"
ROW_LAYOUT = "preferences"
TRUNCATE = ("left", "drop")
CANDIDATE_TRUNCATE = ("drop", "right")
COUNTS = ("num_examples", "dropped_empty_prompts", "dropped_long_prompts",
          "truncated_prompts", "dropped_empty_candidates", "dropped_long_candidates",
          "truncated_candidates", "dropped_extra_candidates", "skipped_few_candidates",
          "skipped_tied_scores")
_INT32_MAX = np.iinfo(np.int32).max


def preference_arrays(prompt_len: int, completion_len: int, num_candidates: int,
                      with_ref: bool) -> dict:
    """{name: (row shape, dtype)} of a preference store."""
    k, i32, f32 = num_candidates, np.dtype(np.int32), np.dtype(np.float32)
    arrays = {"prompt": ((prompt_len,), i32), "prompt_len": ((), i32),
              "candidates": ((k, completion_len), i32), "candidate_len": ((k,), i32),
              "scores": ((k,), f32), "valid": ((k,), np.dtype(bool)), "example_id": ((), i32)}
    if with_ref:
        arrays["ref_logps"] = ((k,), f32)
    return arrays


def _finite(values, what: str, example: int) -> np.ndarray:
    out = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(out)) or np.any(np.abs(out) > np.finfo(np.float32).max):
        raise ValueError(f"example {example}: {what} must be finite float32 values, got "
                         f"{out.tolist()}; fix or drop the example before building the store")
    return out


def _ids(values, vocab_size: int, what: str, example: int) -> np.ndarray:
    ids = np.asarray(values, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"example {example}: {what} holds ids in [{ids.min()}, {ids.max()}], "
                         f"outside the vocabulary [0, {vocab_size}); wrong tokenizer?")
    return ids


class _Selector:
    """Applies the selection rules of the module docstring, one example at a time."""

    def __init__(self, *, prompt_len, completion_len, num_candidates, vocab_size, truncate,
                 candidate_truncate, skip_tied, with_ref):
        self.p, self.c, self.k, self.v = prompt_len, completion_len, num_candidates, vocab_size
        self.truncate, self.cand_truncate = truncate, candidate_truncate
        self.skip_tied, self.with_ref = skip_tied, with_ref
        self.counts = dict.fromkeys(COUNTS, 0)

    def prompt(self, i: int, ids) -> np.ndarray | None:
        ids = _ids(ids, self.v, "the prompt", i)
        if ids.size == 0:
            self.counts["dropped_empty_prompts"] += 1
            return None
        if ids.size > self.p:
            if self.truncate == "drop" or self.with_ref:
                self.counts["dropped_long_prompts"] += 1
                return None
            self.counts["truncated_prompts"] += 1
            ids = ids[-self.p:]
        return ids

    def candidates(self, i: int, cands, scores, refs) -> list[tuple] | None:
        kept = []
        for j, ids in enumerate(cands):
            ids = _ids(ids, self.v, f"candidate {j}", i)
            if ids.size == 0:
                self.counts["dropped_empty_candidates"] += 1
                continue
            if ids.size > self.c:
                if self.cand_truncate == "drop" or self.with_ref:
                    self.counts["dropped_long_candidates"] += 1
                    continue
                self.counts["truncated_candidates"] += 1
                ids = ids[:self.c]
            kept.append((j, ids, scores[j], 0.0 if refs is None else refs[j]))
        if len(kept) > self.k:  # the K best by score (stable: ties keep input order)
            self.counts["dropped_extra_candidates"] += len(kept) - self.k
            best = sorted(sorted(range(len(kept)), key=lambda t: -kept[t][2])[:self.k])
            kept = [kept[t] for t in best]
        if len(kept) < 2:
            self.counts["skipped_few_candidates"] += 1
            return None
        if self.skip_tied and len({s for _, _, s, _ in kept}) == 1:
            self.counts["skipped_tied_scores"] += 1
            return None
        return kept


def _fill(rows: list[tuple], *, prompt_len, completion_len, num_candidates, pad_id,
          with_ref) -> dict[str, np.ndarray]:
    n, k = len(rows), num_candidates
    out = {"prompt": np.full((n, prompt_len), pad_id, np.int32),
           "prompt_len": np.zeros(n, np.int32),
           "candidates": np.full((n, k, completion_len), pad_id, np.int32),
           "candidate_len": np.zeros((n, k), np.int32), "scores": np.zeros((n, k), np.float32),
           "valid": np.zeros((n, k), bool), "example_id": np.zeros(n, np.int32)}
    if with_ref:
        out["ref_logps"] = np.zeros((n, k), np.float32)
    for r, (example, prompt, kept) in enumerate(rows):
        out["prompt"][r, :prompt.size], out["prompt_len"][r] = prompt, prompt.size
        out["example_id"][r] = example
        for slot, (_, ids, score, ref) in enumerate(kept):
            out["candidates"][r, slot, :ids.size] = ids
            out["candidate_len"][r, slot], out["scores"][r, slot] = ids.size, score
            out["valid"][r, slot] = True
            if with_ref:
                out["ref_logps"][r, slot] = ref
    return out


def _write(out_dir, arrays: dict[str, np.ndarray], meta: dict, counts: dict, *,
           shard_rows: int | None, overwrite: bool) -> dict:
    """Writes a preference store from whole in-memory arrays; returns its summary."""
    n = len(arrays["prompt"])
    layout = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
    row_bytes = sum(a[0].nbytes for a in arrays.values())
    shard_rows = shard_rows or min(n, max(1, 2**24 // row_bytes))
    digest = fingerprint_json({k: fingerprint_bytes(np.ascontiguousarray(v))
                               for k, v in sorted(arrays.items())})
    with RowStoreWriter(out_dir, arrays=layout, num_rows=n, shard_rows=shard_rows,
                        metadata=meta, overwrite=overwrite, layout="record") as w:
        for shard in w.missing_shards():
            lo, hi = w.shard_range(shard)
            w.write_shard(shard, {k: v[lo:hi] for k, v in arrays.items()})
        manifest = w.finalize({"data_fingerprint": fingerprint_json(
            {"row_layout": ROW_LAYOUT, "rows_digest": digest, **{
                k: meta[k] for k in ("prompt_len", "completion_len", "num_candidates",
                                     "vocab_size", "reference_fingerprint")}}),
            "counts": counts})
    return {"path": str(out_dir), "rows": n, **counts,
            "fingerprint": manifest["data_fingerprint"]}


@primary_writes("preferences")
def build_preference_store(out_dir: str | os.PathLike, prompts: Sequence, candidates: Sequence,
                           scores: Sequence, *, tokenizer, prompt_len: int, completion_len: int,
                           vocab_size: int | None = None, num_candidates: int | None = None,
                           ref_logps: Sequence | None = None,
                           reference_fingerprint: str | None = None,
                           example_ids: Sequence[int] | None = None, pad_id: int | None = None,
                           truncate: str = "left", candidate_truncate: str = "drop",
                           skip_tied: bool = True, shard_rows: int | None = None,
                           overwrite: bool = False) -> dict:
    """Writes a preference store from in-memory token ids (see the module docstring).

    Args:
      out_dir: the store directory.
      prompts: per example, a 1-D sequence of prompt ids.
      candidates: per example, a list of candidate id sequences (the completions, EOS
        included if it should be scored).
      scores: per example, one finite score per candidate (higher is better).
      tokenizer: the Hugging Face tokenizer the ids come from, or its fingerprint string
        (`kdjax.data.tokenizer_fingerprint`); recorded in the manifest.
      prompt_len, completion_len: P and C, the row widths.
      vocab_size: V (ids must lie in [0, V)); default len(tokenizer).
      num_candidates: K slots per row; default the largest candidate count.
      ref_logps: per example, the reference's summed log-prob of each candidate given the
        prompt (`kdjax.train.ranking.precompute_reference_logps`), or None.
      reference_fingerprint: what identifies that reference (e.g. its checkpoint's
        fingerprint); required with ref_logps.
      example_ids: per example, its id (int32); default the input index.
      pad_id: id written in padding slots; default the tokenizer's pad id, else 0.
      truncate: long prompts: "left" (keep the last P ids) or "drop".
      candidate_truncate: long candidates: "drop" or "right" (keep the first C ids).
      skip_tied: skip examples whose kept candidates all score the same.
      shard_rows: rows per shard (default ~16 MiB shards); overwrite: replace a store
        written with another plan.

    Returns:
      {"path", "rows", "fingerprint", and every count of `COUNTS`}.
    """
    n = len(prompts)
    if len(candidates) != n or len(scores) != n or (ref_logps is not None and
                                                      len(ref_logps) != n):
        raise ValueError(f"prompts, candidates, scores (and ref_logps) need one entry per "
                         f"example; got {n}, {len(candidates)}, {len(scores)}"
                         + ("" if ref_logps is None else f", {len(ref_logps)}"))
    if truncate not in TRUNCATE or candidate_truncate not in CANDIDATE_TRUNCATE:
        raise ValueError(f"truncate must be one of {TRUNCATE} and candidate_truncate one of "
                         f"{CANDIDATE_TRUNCATE}; got {truncate!r}, {candidate_truncate!r}")
    if prompt_len < 1 or completion_len < 1:
        raise ValueError(f"prompt_len and completion_len must be >= 1, got {prompt_len}, "
                         f"{completion_len}")
    if (ref_logps is None) != (reference_fingerprint is None):
        raise ValueError("ref_logps and reference_fingerprint go together: the manifest must "
                         "say which model computed the stored reference log-probs")
    fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
    if vocab_size is None:
        if isinstance(tokenizer, str):
            raise ValueError("vocab_size is needed when tokenizer is a fingerprint string")
        vocab_size = len(tokenizer)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    k = num_candidates or max((len(c) for c in candidates), default=0)
    if k < 2:
        raise ValueError(f"num_candidates must be >= 2 (a ranking needs two candidates), got "
                         f"{k}")
    ids = np.arange(n) if example_ids is None else np.asarray(example_ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > _INT32_MAX):
        raise ValueError(f"example_ids must lie in [0, {_INT32_MAX}] (stored as int32), got "
                         f"[{ids.min()}, {ids.max()}]")
    sel = _Selector(prompt_len=prompt_len, completion_len=completion_len, num_candidates=k,
                    vocab_size=vocab_size, truncate=truncate,
                    candidate_truncate=candidate_truncate, skip_tied=skip_tied,
                    with_ref=ref_logps is not None)
    rows = []
    for i in range(n):
        if len(scores[i]) != len(candidates[i]) or (
                ref_logps is not None and len(ref_logps[i]) != len(candidates[i])):
            raise ValueError(f"example {i}: {len(candidates[i])} candidates but "
                             f"{len(scores[i])} scores"
                             + ("" if ref_logps is None else f", {len(ref_logps[i])} ref_logps"))
        s = _finite(scores[i], "scores", i).astype(np.float32)  # ties as stored
        r = None if ref_logps is None else _finite(ref_logps[i], "ref_logps", i)
        prompt = sel.prompt(i, prompts[i])
        kept = None if prompt is None else sel.candidates(i, candidates[i], s, r)
        if kept is not None:
            rows.append((int(ids[i]), prompt, kept))
    counts = {**sel.counts, "num_examples": n}
    if not rows:
        raise ValueError(f"no example is left for the preference store: {counts}")
    arrays = _fill(rows, prompt_len=prompt_len, completion_len=completion_len,
                   num_candidates=k, pad_id=pad_id, with_ref=ref_logps is not None)
    meta = {"kind": KIND, "row_layout": ROW_LAYOUT, "prompt_len": prompt_len,
            "completion_len": completion_len, "num_candidates": k, "pad_id": int(pad_id),
            "vocab_size": int(vocab_size), "tokenizer_fingerprint": fp,
            "has_ref_logps": ref_logps is not None,
            "reference_fingerprint": reference_fingerprint, "truncate": truncate,
            "candidate_truncate": candidate_truncate, "skip_tied": bool(skip_tied),
            "num_examples": n}
    return _write(out_dir, arrays, meta, counts, shard_rows=shard_rows, overwrite=overwrite)


class PreferenceStore:
    """A complete preference store opened for reading.

    Attributes:
      manifest (dict), path, num_rows, prompt_len (P), completion_len (C),
      num_candidates (K), vocab_size, pad_id, has_ref_logps, reference_fingerprint,
      fingerprint (data fingerprint), tokenizer_fingerprint, counts.
    """

    def __init__(self, path: str | os.PathLike):
        self._rows = RowStore(path)
        self.path = Path(path)
        self.manifest = m = self._rows.manifest
        if m.get("kind") != KIND:
            raise StoreMismatchError(
                f"{str(path)!r} is not a preference store (kind {m.get('kind')!r}); write one "
                "with kdjax.data.preferences.build_preference_store (or `kdjax score`)")
        self.num_rows = int(m["num_rows"])
        self.prompt_len, self.completion_len = int(m["prompt_len"]), int(m["completion_len"])
        self.num_candidates = int(m["num_candidates"])
        self.vocab_size, self.pad_id = int(m["vocab_size"]), int(m["pad_id"])
        self.has_ref_logps = bool(m["has_ref_logps"])
        self.reference_fingerprint = m.get("reference_fingerprint")
        self.fingerprint = str(m["data_fingerprint"])
        self.tokenizer_fingerprint = str(m["tokenizer_fingerprint"])
        self.counts = dict(m.get("counts", {}))

    def read(self, rows) -> dict[str, np.ndarray]:
        """Rows as `{prompt [n, P], prompt_len [n], candidates [n, K, C], candidate_len
        [n, K], scores [n, K], valid [n, K], example_id [n]}` (+ `ref_logps [n, K]`);
        int32, float32 and bool."""
        return self._rows.read(rows)

    def check(self) -> list[str]:
        """Reads every chunk; one message per damaged chunk (empty when intact)."""
        return self._rows.check()

    def check_tokenizer(self, tokenizer, *, whose: str = "the run's") -> None:
        """Raises StoreMismatchError unless `tokenizer` (or its fingerprint) is the store's."""
        fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
        if fp != self.tokenizer_fingerprint:
            raise StoreMismatchError(
                f"preference store {str(self.path)!r} was tokenized with another tokenizer "
                f"than {whose}: {self.tokenizer_fingerprint[:16]}… (the store's) vs "
                f"{fp[:16]}… ({whose}); rebuild the store with this tokenizer")

    def check_reference(self, fingerprint: str) -> None:
        """Raises StoreMismatchError unless the stored ref_logps come from `fingerprint`."""
        if not self.has_ref_logps:
            raise StoreMismatchError(
                f"preference store {str(self.path)!r} holds no reference log-probs; compute "
                "them once (kdjax.train.ranking.precompute_reference_logps, then "
                "with_reference_logps) or use reference='online'")
        if fingerprint != self.reference_fingerprint:
            raise StoreMismatchError(
                f"preference store {str(self.path)!r} holds reference log-probs of "
                f"{self.reference_fingerprint!r}, not of {fingerprint!r}; recompute them for "
                "this reference")

    def __repr__(self) -> str:
        return (f"PreferenceStore({str(self.path)!r}, rows={self.num_rows}, "
                f"P={self.prompt_len}, K={self.num_candidates}, C={self.completion_len}, "
                f"ref={self.has_ref_logps}, data={self.fingerprint[:12]})")


def open_preference_store(path: str | os.PathLike, split: str | None = None
                          ) -> PreferenceStore:
    """Opens a preference store: `path` itself, or `path/split`."""
    from kdjax.data.token_store import split_dir

    return PreferenceStore(split_dir(path, split, "open_preference_store"))


@primary_writes("preferences")
def with_reference_logps(store: PreferenceStore, ref_logps: np.ndarray,
                         out_dir: str | os.PathLike, *, reference_fingerprint: str,
                         overwrite: bool = False) -> dict:
    """Writes a copy of `store` with `ref_logps [num_rows, K]` added (the precompute pass's
    output, in row order; padding slots are stored as 0). Returns the new store's summary."""
    ref = np.asarray(ref_logps, np.float64)
    want = (store.num_rows, store.num_candidates)
    if ref.shape != want:
        raise ValueError(f"ref_logps has shape {ref.shape}, expected {want} (rows, K) for "
                         f"{store!r}")
    arrays = store.read(np.arange(store.num_rows))
    bad = ~np.isfinite(ref) & arrays["valid"]
    if bad.any():
        r, k = np.argwhere(bad)[0]
        raise ValueError(f"ref_logps[{r}, {k}] = {ref[r, k]} is not finite; the reference "
                         "gives that candidate no probability (wrong reference or vocabulary?)")
    arrays["ref_logps"] = np.where(arrays["valid"], ref, 0.0).astype(np.float32)
    meta = {k: v for k, v in store.manifest.items() if k in (
        "kind", "row_layout", "prompt_len", "completion_len", "num_candidates", "pad_id",
        "vocab_size", "tokenizer_fingerprint", "truncate", "candidate_truncate", "skip_tied",
        "num_examples")}
    meta.update(has_ref_logps=True, reference_fingerprint=reference_fingerprint,
                source_fingerprint=store.fingerprint)
    return _write(out_dir, arrays, meta, store.counts, shard_rows=None, overwrite=overwrite)
