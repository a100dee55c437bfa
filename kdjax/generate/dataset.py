"""The generated dataset: what `kdjax generate` writes and `kdjax pack` / `kdjax score` read.

    <dir>/manifest.json        kind "generated", format version, the plan (model and
                               tokenizer fingerprints, sampling settings, seed, n, the
                               source's fingerprint), shard count, `complete`, summary
    <dir>/data/shard-NNNNNN.parquet   the records of examples [i·E, (i+1)·E), in order
    <dir>/ledger/shard-NNNNNN.json    written after its shard file: the shard is done

One record per (example, sample): `example_id`, `sample_index`, `prompt`, `completion`
(text), `prompt_ids`, `completion_ids` (int lists), `finish_reason` (eos | stop | length),
`logprobs` (the generator's per-token log-probs of the completion ids, T = 1),
`mean_logprob`, plus any extra columns a caller adds (e.g. `instruction` for expansion).
`datasets.load_dataset("parquet", data_files="<dir>/data/*.parquet")` reads it.

Crash safety: each shard file is written to a temporary sibling, fsynced and renamed, then
recorded in the ledger; the manifest says `complete: false` until the last shard is in.
A rerun with the same plan redoes only the shards missing from the ledger. Records are a
pure function of (plan, example), so a resumed run ends with the same bytes as an
uninterrupted one (the parquet writer is deterministic for the same table).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdjax.storage.errors import StoreMismatchError
from kdjax.storage.fingerprint import fingerprint_json
from kdjax.storage.ledger import ShardLedger
from kdjax.storage.manifest import atomic_path, read_manifest, write_manifest

KIND = "generated"
FORMAT_VERSION = 1
FINISH_REASONS = ("eos", "stop", "length")
DATA_DIR = "data"

# column → pyarrow type name; extra columns are strings
COLUMNS = {"example_id": "int64", "sample_index": "int32", "prompt": "string",
           "completion": "string", "prompt_ids": "list<int32>",
           "completion_ids": "list<int32>", "finish_reason": "string",
           "logprobs": "list<float>", "mean_logprob": "float"}


def _schema(extra: Sequence[str] = ()):
    import pyarrow as pa

    types = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(),
             "float": pa.float32(), "list<int32>": pa.list_(pa.int32()),
             "list<float>": pa.list_(pa.float32())}
    fields = [pa.field(name, types[t]) for name, t in COLUMNS.items()]
    fields += [pa.field(name, pa.string()) for name in extra]
    return pa.schema(fields)


def shard_path(root: str | os.PathLike, shard: int) -> Path:
    return Path(root) / DATA_DIR / f"shard-{shard:06d}.parquet"


class GeneratedWriter:
    """Writes a generated dataset shard by shard, resumably. Subclasses write other kinds
    of parquet datasets the same way by setting `KIND`, `NOUN`, `FORMAT_VERSION` and
    overriding `schema()`, `columns()` and `check_record()` (`kdjax.score.dataset`).

    Args:
      root: the dataset directory.
      plan: everything the records depend on (JSON-able): a rerun must give the same plan
        to resume; a different plan is refused unless `overwrite`.
      num_shards: how many shards the run produces.
      extra_columns: string columns beyond `COLUMNS`.
      overwrite: start over when the directory holds another plan's dataset.
      own_files: names a fresh directory may already hold (written by the same run, e.g.
        the expansion's instruction list).
    """

    KIND = KIND
    NOUN = "generated dataset"
    FORMAT_VERSION = FORMAT_VERSION

    def __init__(self, root: str | os.PathLike, plan: dict, num_shards: int, *,
                 extra_columns: Sequence[str] = (), overwrite: bool = False,
                 own_files: Sequence[str] = ()):
        self.own_files = set(own_files)
        self.root = Path(root)
        self.plan = dict(plan)
        self.plan_fingerprint = fingerprint_json(self.plan)
        self.extra_columns = tuple(extra_columns)
        self.ledger = ShardLedger(self.root, num_shards)
        self.num_shards = int(num_shards)
        old = self._existing()
        if old is not None and old.get("plan_fingerprint") != self.plan_fingerprint:
            if not overwrite:
                changed = sorted(k for k in {*old.get("plan", {}), *self.plan}
                                 if old.get("plan", {}).get(k) != self.plan.get(k))
                raise StoreMismatchError(
                    f"{str(self.root)!r} holds a {self.NOUN} made with other settings "
                    f"(differing: {', '.join(changed) or 'format'}); pass --overwrite to "
                    "replace it, or write to another --out")
            self._forget_shards()
        (self.root / DATA_DIR).mkdir(parents=True, exist_ok=True)
        if old is None or old.get("plan_fingerprint") != self.plan_fingerprint:
            write_manifest(self.root, self._manifest(complete=False))

    def _existing(self) -> dict | None:
        try:
            m = read_manifest(self.root, require_complete=False)
        except Exception:  # noqa: BLE001 — no (readable) manifest: a fresh directory
            names = sorted(p.name for p in self.root.iterdir()
                           if p.name not in self.own_files) if self.root.exists() else []
            if names:
                names = names[:5]
                raise StoreMismatchError(
                    f"{str(self.root)!r} exists and is not a {self.NOUN} (holds "
                    f"{names}); choose an empty or new --out") from None
            return None
        if m.get("kind") != self.KIND:
            raise StoreMismatchError(f"{str(self.root)!r} holds a {m.get('kind')!r} store, "
                                     f"not a {self.NOUN}; choose another --out")
        return m

    def _manifest(self, *, complete: bool, summary: dict | None = None) -> dict:
        return {"kind": self.KIND, "format_version": self.FORMAT_VERSION, "plan": self.plan,
                "tokenizer_fingerprint": self.plan.get("tokenizer_fingerprint"),
                "plan_fingerprint": self.plan_fingerprint, "num_shards": self.num_shards,
                "columns": self.columns(), "summary": summary or {},
                "complete": complete}

    def start_over(self) -> GeneratedWriter:
        """Forgets every written shard and marks the dataset incomplete (for outputs that
        are rewritten whole, e.g. a curated copy): a crash while rewriting them leaves a
        dataset that reads as incomplete, never a mix of two writes."""
        write_manifest(self.root, self._manifest(complete=False))
        self._forget_shards()
        return self

    def _forget_shards(self) -> None:
        self.ledger.clear()
        for p in (self.root / DATA_DIR).glob("*.parquet"):
            p.unlink()

    def missing(self) -> list[int]:
        """Shards still to write (all of them on a fresh run)."""
        return self.ledger.missing()

    def schema(self):
        """The pyarrow schema of a shard."""
        return _schema(self.extra_columns)

    def columns(self) -> list[str]:
        return [*COLUMNS, *self.extra_columns]

    def check_record(self, r: dict) -> None:
        """Raises ValueError for a record the dataset must not hold."""
        if r["finish_reason"] not in FINISH_REASONS:
            raise ValueError(f"finish_reason {r['finish_reason']!r} is not one of "
                             f"{FINISH_REASONS}")

    def write_shard(self, shard: int, records: Sequence[dict],
                    info: dict | None = None) -> None:
        """Writes one shard's records atomically, then records it in the ledger (with
        `info`, e.g. the shard's counts, beside its record count)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = self.schema()
        for r in records:
            self.check_record(r)
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in records],
                                     schema=schema)
        with atomic_path(shard_path(self.root, shard)) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.ledger.record(shard, {"records": len(records), **(info or {})})

    def finish(self, summary: dict) -> None:
        """Marks the dataset complete (after every shard is in the ledger)."""
        missing = self.ledger.missing()
        if missing:
            raise RuntimeError(f"cannot finish: shards {missing[:5]} are not written yet")
        write_manifest(self.root, self._manifest(complete=True, summary=summary))


class GeneratedDataset:
    """A complete generated dataset, read back (records in shard order).
    `require_complete=False` reads one whose shards are all written but whose manifest is
    not yet marked complete (its writer, summarising it before `finish`)."""

    def __init__(self, root: str | os.PathLike, *, require_complete: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, require_complete=require_complete)
        if self.manifest.get("kind") != KIND:
            raise StoreMismatchError(f"{str(self.root)!r} is a {self.manifest.get('kind')!r} "
                                     "store, not a generated dataset")
        self.plan = self.manifest["plan"]

    @property
    def files(self) -> list[str]:
        return [str(shard_path(self.root, i)) for i in range(self.manifest["num_shards"])]

    def shards(self, columns: Sequence[str] | None = None) -> Iterator[list[dict]]:
        """Each shard's records (whole examples, in order), one shard in memory at a time;
        `columns`: only these."""
        import pyarrow.parquet as pq

        for path in self.files:
            yield pq.read_table(path, columns=columns).to_pylist()

    def records(self) -> Iterator[dict]:
        for shard in self.shards():
            yield from shard

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.files)


def is_generated(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a generated dataset's manifest."""
    try:
        return read_manifest(path, require_complete=False).get("kind") == KIND
    except Exception:  # noqa: BLE001
        return False
