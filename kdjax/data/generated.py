"""Generated datasets (SeqKD): what `kdjax generate` writes, read by `kdjax pack`.

A generated dataset is a directory of parquet shards (any depth, read in sorted path
order) and a `manifest.json` with `"kind": "generated"` and the generator's
`tokenizer_fingerprint` (`kdjax.data.tokenizer_fingerprint`). Each row is one sample:
`prompt`, `completion` (text), `prompt_ids`, `completion_ids` (lists of int),
`finish_reason` (`eos` | `stop` | `length`), `logprobs`, `mean_logprob`, `example_id`,
`sample_index`. Packing reads only `prompt_ids` and `completion_ids`: the document is
`prompt_ids + completion_ids` as generated (no re-tokenisation; the completion's
end-of-sequence token is trained on when the generator kept it in `completion_ids`), and
only the completion tokens are training targets, so the prompt is masked out of the loss
(`loss_mask` is True at the last prompt token, which predicts the first completion token,
and at every completion token but the last). A sample with no completion tokens holds no
target and is skipped. The tokenizer must be the generator's: another one is refused.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

from kdjax.storage import (
    StoreIncompleteError,
    StoreMismatchError,
    fingerprint_file,
    read_json,
)

KIND = "generated"
REQUIRED = ("prompt_ids", "completion_ids")


def _single_dir(source) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return str(source) if os.path.isdir(source) else None
    if isinstance(source, Sequence) and len(source) == 1:
        return _single_dir(source[0])
    return None


def read_generated_manifest(source) -> dict | None:
    """The manifest of a generated dataset when `source` (a path, or a list of one) is
    such a directory, with `manifest_sha256` (its file's sha256) added; else None."""
    if isinstance(source, Sequence) and not isinstance(source, str) and len(source) > 1:
        for s in source:
            if read_generated_manifest(s) is not None:
                raise ValueError(f"{str(s)!r} is a generated dataset; pack it on its own "
                                 "(one generated dataset per `kdjax pack`)")
        return None
    path = _single_dir(source)
    if path is None or not os.path.isfile(os.path.join(path, "manifest.json")):
        return None
    manifest = read_json(os.path.join(path, "manifest.json"))
    if manifest.get("kind") != KIND:
        return None
    if manifest.get("complete") is False:  # its writer was interrupted, or still runs
        raise StoreIncompleteError(
            f"generated dataset {path!r} is incomplete (its `kdjax generate` was interrupted "
            "or is still running); rerun the same `kdjax generate` command to finish it")
    return {**manifest, "manifest_sha256": fingerprint_file(os.path.join(path, "manifest.json"))}


def check_generated_tokenizer(manifest: dict, source, tokenizer) -> None:
    """Raises StoreMismatchError unless `tokenizer` is the one that generated the data."""
    from kdjax.data.tokenize import tokenizer_fingerprint

    want, fp = manifest.get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer)
    if want == fp:
        return
    got = f"{want[:16]}…" if isinstance(want, str) else "none recorded"
    raise StoreMismatchError(
        f"generated dataset {str(_single_dir(source))!r} was generated with another "
        f"tokenizer than --tokenizer: tokenizer fingerprint {got} (the generator's) vs "
        f"{fp[:16]}…, vocabulary {len(tokenizer)} (--tokenizer); its token ids would mean "
        "other tokens. Pack it with the generator's tokenizer")


def load_generated(source, *, streaming: bool = False, cache_dir: str | None = None):
    """The samples of a generated dataset directory as a `datasets` (Iterable)Dataset."""
    import datasets

    path = _single_dir(source)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.parquet"),
                             recursive=True))
    if not files:
        raise FileNotFoundError(f"generated dataset {path!r} has a manifest but no "
                                "*.parquet shards")
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
        raise ValueError(f"generated dataset {path!r} holds no records (its curation kept "
                         "none?); see the dropped counts in its manifest's summary, relax "
                         "the filter, or pack the uncurated dataset")
    ds = datasets.load_dataset("parquet", data_files={"train": files}, split="train",
                               streaming=streaming,
                               **({"cache_dir": str(cache_dir)} if cache_dir else {}))
    from kdjax.data.tokenize import column_names

    if missing := [c for c in REQUIRED if c not in column_names(ds)]:
        raise ValueError(f"generated dataset {path!r} lacks the column(s) {missing}")
    return ds


def generated_batch(batch: dict, vocab_size: int) -> dict:
    """`datasets.map(batched=True)` function: samples → documents (`ids`, `train`,
    `length`); `length` is 0 for a sample without completion tokens (the packer skips
    it)."""
    ids, train, length = [], [], []
    for k, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        p, c = np.asarray(p or [], np.int64), np.asarray(c or [], np.int64)
        both = np.concatenate([p, c])
        if both.size and (both.min() < 0 or both.max() >= vocab_size):
            eid = batch["example_id"][k] if "example_id" in batch else "?"
            raise ValueError(f"generated sample (example_id {eid}) has token ids in "
                             f"[{both.min()}, {both.max()}], outside the tokenizer's "
                             f"vocabulary [0, {vocab_size})")
        ids.append(both.astype(np.int32))
        train.append(np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)]))
        length.append(len(both) if len(c) else 0)
    return {"ids": ids, "train": train, "length": length}


def generated_docs(ds, *, vocab_size: int):
    """Documents (columns `ids`, `train`, `length`, as `tokenize_dataset` gives) from the
    samples of a generated dataset: prompt then completion, training on the completion."""
    import datasets

    from kdjax.data.tokenize import column_names

    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                  "train": datasets.List(datasets.Value("bool")),
                                  "length": datasets.Value("int64")})
    kw = dict(batched=True, batch_size=512, fn_kwargs={"vocab_size": int(vocab_size)},
              remove_columns=column_names(ds), features=features)
    if isinstance(ds, datasets.Dataset):
        kw["desc"] = "reading generated samples"
    return ds.map(generated_batch, **kw)
