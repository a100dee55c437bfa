"""Curation of generated records: keep what a student should learn from, count the rest.

Filters run in a fixed order, each on what the previous ones kept, and each counts what it
drops (the summary of `kdjax generate` and `kdjax filter` prints the counts):

1. `finished`: keep records whose generation ended by itself (finish_reason eos | stop),
   not cut at max_new_tokens.
2. `length`: keep completions of `min_tokens` ≤ len(completion_ids) ≤ `max_tokens`.
3. `mean_logprob`: keep records whose generator mean log-prob ≥ `min_mean_logprob`.
4. `exact_duplicate`: keep the first record of each (prompt, normalized completion);
   normalized = lower-cased, whitespace collapsed.
5. `near_duplicate`: among the samples of one example, drop a completion whose word
   n-gram Jaccard similarity to an already kept one is ≥ `near_duplicate`.
6. `self_consistency`: with an `answer_regex`, extract each sample's answer (the last
   match; group 1 if the regex has a group) and keep the samples of an example whose
   answer is the example's majority answer (Wang et al. 2023). Samples without an answer
   are dropped; a tie goes to the answer whose first sample comes first.

Records are plain dicts with the generated-dataset columns (`kdjax.generate.dataset`).
`curate_shards` runs the filters over a whole dataset one shard at a time: memory holds one
shard and a 16-byte digest per distinct (prompt, completion) that reached filter 4 (the
exact-duplicate filter is dataset-wide; the per-example filters 5 and 6 see an example's
samples, which a generated dataset keeps in one shard). `write_curated` writes the
curated copy of a generated dataset that way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

from kdjax.schema import ConfigError, check

FILTERS = ("finished", "length", "mean_logprob", "exact_duplicate", "near_duplicate",
           "self_consistency")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """What `kdjax generate` keeps (its `filter` section; also `kdjax filter`)."""

    finished_only: bool = True
    """Drop completions cut at max_new_tokens (finish_reason length)."""
    min_tokens: int = 1
    """Shortest completion kept, in tokens (EOS included)."""
    max_tokens: int | None = None
    """Longest completion kept, in tokens; null = no bound."""
    min_mean_logprob: float | None = None
    """Drop completions whose mean per-token log-prob under the generator is below this."""
    dedup: bool = True
    """Drop exact duplicates of (prompt, completion) after normalizing case and spaces."""
    near_duplicate: float | None = 0.9
    """Drop a sample whose word n-gram Jaccard similarity to a kept sample of the same
    example is at least this; null = off."""
    ngram: int = 3
    """n of the word n-grams of the near-duplicate test."""
    answer_regex: str | None = None
    """Self-consistency: a regex extracting the answer from a completion (group 1 if it has
    groups, else the whole match; the last match counts); keep the majority answer's
    samples. null = off."""

    def __post_init__(self):
        check(self.min_tokens >= 0, "filter.min_tokens", f"must be >= 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.max_tokens >= self.min_tokens,
              "filter.max_tokens", f"must be >= min_tokens={self.min_tokens}, got "
              f"{self.max_tokens}")
        check(self.near_duplicate is None or 0.0 < self.near_duplicate <= 1.0,
              "filter.near_duplicate", f"must be in (0, 1] or null, got {self.near_duplicate}")
        check(self.ngram >= 1, "filter.ngram", f"must be >= 1, got {self.ngram}")
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ConfigError(f"filter.answer_regex: {self.answer_regex!r} is not a valid "
                                  f"regular expression ({e})") from None


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalized text (the whole text as one gram when shorter)."""
    words = normalize(text).split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def extract_answer(text: str, pattern: re.Pattern) -> str | None:
    """The last match of `pattern` in `text` (group 1 when it has groups), stripped."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    value = m.group(1) if pattern.groups else m.group(0)
    return None if value is None else value.strip()


def curate(records: Iterable[dict], config: FilterConfig, *, seen: set | None = None
           ) -> tuple[list[dict], dict[str, int]]:
    """`(kept records in their order, {filter name: records it dropped})`.

    seen: digests of the (prompt, completion) pairs kept by earlier calls, for the exact-
      duplicate filter across calls (updated in place); None: this call's records only.
    """
    seen = set() if seen is None else seen
    dropped = dict.fromkeys(FILTERS, 0)
    kept = list(records)

    def keep_if(name, pred):
        nonlocal kept
        out = [r for r in kept if pred(r)]
        dropped[name] += len(kept) - len(out)
        kept = out

    if config.finished_only:
        keep_if("finished", lambda r: r["finish_reason"] in ("eos", "stop"))
    hi = config.max_tokens
    keep_if("length", lambda r: config.min_tokens <= len(r["completion_ids"])
            and (hi is None or len(r["completion_ids"]) <= hi))
    if config.min_mean_logprob is not None:
        keep_if("mean_logprob", lambda r: r["mean_logprob"] >= config.min_mean_logprob)
    if config.dedup:
        def first(r):
            key = hashlib.blake2b(f"{normalize(r['prompt'])}\0{normalize(r['completion'])}"
                                  .encode(), digest_size=16).digest()
            new = key not in seen
            seen.add(key)
            return new

        keep_if("exact_duplicate", first)
    if config.near_duplicate is not None:
        kept_grams: dict[int, list[set]] = defaultdict(list)

        def distinct(r):
            grams = ngrams(r["completion"], config.ngram)
            pool = kept_grams[r["example_id"]]
            if any(jaccard(grams, g) >= config.near_duplicate for g in pool):
                return False
            pool.append(grams)
            return True

        keep_if("near_duplicate", distinct)
    if config.answer_regex is not None:
        majority = majority_answers(kept, re.compile(config.answer_regex))
        keep_if("self_consistency", lambda r: r["_answer"] is not None
                and r["_answer"] == majority.get(r["example_id"]))
        for r in kept:
            r["answer"] = r.pop("_answer")
    return kept, dropped


def curate_shards(shards: Iterable[Sequence[dict]], config: FilterConfig,
                  write: Callable[[int, list[dict]], None]) -> tuple[int, int, dict[str, int]]:
    """Curates a dataset shard by shard, calling `write(shard, kept records)` for each
    (an empty list for a shard that keeps nothing). Shards must hold whole examples in
    increasing `example_id` ranges, as a generated dataset's do: an example seen in an
    earlier shard is refused, since its samples would be compared apart.
    Returns `(records read, records kept, {filter name: records it dropped})`."""
    seen: set[bytes] = set()
    dropped = dict.fromkeys(FILTERS, 0)
    read = kept_total = 0
    last = None  # the largest example_id of the earlier shards
    for shard, records in enumerate(shards):
        ids = [r["example_id"] for r in records]
        if ids and last is not None and min(ids) <= last:
            raise ValueError(f"shard {shard} holds example {min(ids)}, which an earlier shard "
                             "also holds: curation compares an example's samples within one "
                             "shard (a generated dataset keeps each example in one shard)")
        last = max(ids, default=last)
        kept, counts = curate(records, config, seen=seen)
        write(shard, kept)
        read, kept_total = read + len(records), kept_total + len(kept)
        dropped = {k: dropped[k] + counts[k] for k in FILTERS}
    return read, kept_total, dropped


def write_curated(source, out, config: FilterConfig, extra_columns: Sequence[str]
                  ) -> tuple[int, int, dict[str, int]]:
    """Curates the generated dataset `source` (a `GeneratedDataset`) into `out`, shard by
    shard, with the source's shard count; the copy is rewritten whole and reads as
    incomplete until its last shard is in. Returns what `curate_shards` returns."""
    from kdjax.generate.dataset import GeneratedWriter

    columns = [*extra_columns, *(["answer"] if config.answer_regex and
                                 "answer" not in extra_columns else [])]
    writer = GeneratedWriter(out, {**source.plan, "filter": dataclasses.asdict(config)},
                             source.manifest["num_shards"], extra_columns=columns,
                             overwrite=True).start_over()
    read, kept, dropped = curate_shards(source.shards(), config, writer.write_shard)
    writer.finish({"records": kept, "dropped": dropped, "from": read})
    return read, kept, dropped


def majority_answers(records: Sequence[dict], pattern: re.Pattern) -> dict[int, str]:
    """{example_id: its most frequent extracted answer}; sets `r["_answer"]` on each."""
    votes: dict[int, Counter] = defaultdict(Counter)
    first_seen: dict[tuple[int, str], int] = {}
    for i, r in enumerate(records):
        r["_answer"] = answer = extract_answer(r["completion"], pattern)
        if answer is not None:
            votes[r["example_id"]][answer] += 1
            first_seen.setdefault((r["example_id"], answer), i)
    return {ex: min(c, key=lambda a: (-c[a], first_seen[(ex, a)]))
            for ex, c in votes.items()}
