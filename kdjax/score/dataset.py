"""The preference dataset: what `kdjax score` writes and the ranking objective reads.

    <dir>/manifest.json        kind "preference", format version, the plan (method, teacher,
                               data tokenizer, judge template hash and grade ids, reference,
                               pair settings, the source's fingerprint), `complete`, and
                               the summary (counts of what was skipped and why)
    <dir>/data/shard-NNNNNN.parquet   the rows of prompts [i·E, (i+1)·E), in source order
    <dir>/ledger/shard-NNNNNN.json    written after its shard file, with its counts

One row per prompt with K ≥ 2 candidates (K may differ between rows; lists, no padding):

    example_id      int64          the prompt's id in the source
    prompt          string         the prompt as text (chat markup included)
    question        string         what a judge reads as the prompt
    prompt_ids      list<int32>    the prompt's token ids (the data tokenizer's)
    candidates      list<string>   [K] the completions as text
    candidate_ids   list<list<int32>>  [K] their token ids (EOS kept as generated)
    source_index    list<int32>    [K] each candidate's index in the source (sample_index
                                   of a generated dataset; 0 chosen / 1 rejected for pairs)
    scores          list<float>    [K] f32: the teacher's mean log-prob (likelihood), the
                                   expected grade (judge) or the source's labels (labels)
    rank            list<int32>    [K] 0 = best; ties broken by index (`pairs.rank_of`)
    chosen, rejected list<int32>   [M] the pairs, as indices into `candidates`
    margin          list<float>    [M] score(chosen) − score(rejected) > 0
    grade_mass      list<float>    [K] judge: Σ_g P(g), the judge's mass on the grades
    ref_logps       list<float>    [K] Σ_t log π_ref(c_t | prompt, c_<t) (with a reference)
    ref_counts      list<int32>    [K] the candidate's token count (with a reference)

`grade_mass`, `ref_logps` and `ref_counts` are null when not computed. A prompt with fewer
than two (non-empty) candidates is not written; a prompt without a pair (all scores equal,
or every difference below `min_margin`) is written with empty pair lists. Both are counted
in the manifest's summary. `PreferenceDataset.pairs()` gives the TRL format (prompt,
chosen, rejected, their ids, `ref_chosen_logps`/`ref_rejected_logps`);
`datasets.load_dataset("parquet", data_files="<dir>/data/*.parquet")` reads the rows.

Crash safety and resume are those of the generated dataset (`kdjax.generate.dataset`),
whose writer this one extends: a shard is written atomically, then recorded; a rerun with
the same plan redoes the missing shards, and ends with the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kdjax.generate.dataset import GeneratedWriter, shard_path
from kdjax.storage.errors import StoreMismatchError
from kdjax.storage.manifest import read_manifest

KIND = "preference"
FORMAT_VERSION = 1

COLUMNS = {"example_id": "int64", "prompt": "string", "question": "string",
           "prompt_ids": "list<int32>", "candidates": "list<string>",
           "candidate_ids": "list<list<int32>>", "source_index": "list<int32>",
           "scores": "list<float>", "rank": "list<int32>", "chosen": "list<int32>",
           "rejected": "list<int32>", "margin": "list<float>", "grade_mass": "list<float>",
           "ref_logps": "list<float>", "ref_counts": "list<int32>"}


def schema():
    import pyarrow as pa

    types = {"int64": pa.int64(), "string": pa.string(), "list<int32>": pa.list_(pa.int32()),
             "list<string>": pa.list_(pa.string()), "list<float>": pa.list_(pa.float32()),
             "list<list<int32>>": pa.list_(pa.list_(pa.int32()))}
    return pa.schema([pa.field(name, types[t]) for name, t in COLUMNS.items()])


class PreferenceWriter(GeneratedWriter):
    """Writes a preference dataset shard by shard, resumably (`GeneratedWriter`'s plan,
    ledger and manifest handling, with this kind and schema).

    Args:
      root: the dataset directory.
      plan: everything the rows depend on (JSON-able); a different plan is refused unless
        `overwrite`.
      num_shards: how many shards the run produces.
    """

    KIND, NOUN, FORMAT_VERSION = KIND, "preference dataset", FORMAT_VERSION

    def schema(self):
        return schema()

    def columns(self) -> list[str]:
        return list(COLUMNS)

    def check_record(self, r: dict) -> None:
        pass

    def shard_infos(self) -> list[dict]:
        """The counts recorded with each shard, in shard order."""
        return [self.ledger.info(s) for s in range(self.num_shards)]


class PreferenceDataset:
    """A complete preference dataset, read back (rows in shard order)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest.get("kind") != KIND:
            raise StoreMismatchError(f"{str(self.root)!r} is a {self.manifest.get('kind')!r} "
                                     "store, not a preference dataset (`kdjax score` writes "
                                     "one)")
        self.plan = self.manifest["plan"]

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.manifest.get("tokenizer_fingerprint")

    @property
    def has_reference(self) -> bool:
        return self.plan.get("reference_fingerprint") is not None

    @property
    def files(self) -> list[str]:
        return [str(shard_path(self.root, i)) for i in range(self.manifest["num_shards"])]

    def records(self) -> Iterator[dict]:
        import pyarrow.parquet as pq

        for path in self.files:
            yield from pq.read_table(path).to_pylist()

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)

    def check_tokenizer(self, tokenizer, *, whose: str = "the run's") -> None:
        """Raises StoreMismatchError unless `tokenizer` made the dataset's token ids."""
        from kdjax.data.tokenize import tokenizer_fingerprint

        want, got = self.tokenizer_fingerprint, tokenizer_fingerprint(tokenizer)
        if want != got:
            raise StoreMismatchError(
                f"preference dataset {str(self.root)!r} holds token ids of another tokenizer "
                f"(fingerprint {str(want)[:16]}…) than {whose} ({got[:16]}…); its ids would "
                "mean other tokens. Score the candidates with the student's tokenizer "
                "(`kdjax score tokenizer=DIR`, or generate them with it)")

    def require_reference(self) -> None:
        """Raises StoreMismatchError unless reference log-probs are stored."""
        if not self.has_reference:
            raise StoreMismatchError(
                f"preference dataset {str(self.root)!r} has no reference log-probs "
                "(ref_logps); rerun `kdjax score` with reference=DIR (e.g. the student's "
                "starting checkpoint), or use an online or no reference")

    def pairs(self) -> Iterator[dict]:
        """The chosen/rejected pairs in the TRL format: `prompt`, `chosen`, `rejected` (text),
        `prompt_ids`, `chosen_ids`, `rejected_ids`, `margin`, `example_id`, and
        `ref_chosen_logps`/`ref_rejected_logps` when a reference is stored."""
        for r in self.records():
            for c, j, m in zip(r["chosen"], r["rejected"], r["margin"]):
                pair = {"example_id": r["example_id"], "prompt": r["prompt"],
                        "chosen": r["candidates"][c], "rejected": r["candidates"][j],
                        "prompt_ids": r["prompt_ids"], "chosen_ids": r["candidate_ids"][c],
                        "rejected_ids": r["candidate_ids"][j], "margin": m}
                if r["ref_logps"] is not None:
                    pair.update(ref_chosen_logps=r["ref_logps"][c],
                                ref_rejected_logps=r["ref_logps"][j])
                yield pair

    def store_inputs(self) -> dict:
        """Keyword arguments of `kdjax.data.preferences.build_preference_store` for these
        records (prompt and candidate ids, scores, example ids, the tokenizer fingerprint
        and, when stored, the reference log-probs with the reference's fingerprint); add
        `prompt_len`, `completion_len` and the other store settings."""
        rows = sorted(self.records(), key=lambda r: r["example_id"])
        out = dict(prompts=[r["prompt_ids"] for r in rows],
                   candidates=[r["candidate_ids"] for r in rows],
                   scores=[r["scores"] for r in rows],
                   example_ids=[r["example_id"] for r in rows],
                   tokenizer=self.tokenizer_fingerprint)
        if self.has_reference:
            out.update(ref_logps=[r["ref_logps"] for r in rows],
                       reference_fingerprint=self.plan["reference_fingerprint"])
        return out
