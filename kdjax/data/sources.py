"""Input sources: any Hugging Face `datasets` source, local files or a hub dataset.

`load_source("data/*.jsonl")` infers the builder from the file extension (json, jsonl,
parquet, txt/text, csv, arrow); any other string is passed to `datasets.load_dataset` as
a dataset name or script (hub datasets need network). `streaming=True` gives an
IterableDataset that is read lazily.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
             ".text": "text", ".csv": "csv", ".arrow": "arrow"}


def _builder_for(files: Sequence[str]) -> str:
    exts = {os.path.splitext(f.removesuffix(".gz").removesuffix(".zst"))[1].lower()
            for f in files}
    builders = {_BUILDERS.get(e) for e in exts}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"cannot infer the file format of {sorted(files)[:5]} (extensions "
                         f"{sorted(exts)}); use files of one of {sorted(_BUILDERS)} or pass "
                         "format='json'|'parquet'|'text'|'csv'")
    return builders.pop()


def load_source(source: str | Sequence[str], *, split: str = "train", format: str | None = None,
                streaming: bool = False, name: str | None = None, **kwargs):
    """Loads a dataset split.

    Args:
      source: a file, a glob, a directory of files, a list of those, or a dataset name.
      split: the split to load ("train" for local files).
      format: the `datasets` builder for local files; inferred from extensions if None.
      streaming: return an IterableDataset (lazy) instead of a Dataset.
      name: dataset config name, for hub datasets.
      kwargs: passed on to `datasets.load_dataset`.

    Returns:
      `datasets.Dataset` or `datasets.IterableDataset`.
    """
    import datasets

    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for s in map(str, sources):
        if os.path.isdir(s):
            files += sorted(f for f in glob.glob(os.path.join(s, "**", "*"), recursive=True)
                            if os.path.isfile(f) and not os.path.basename(f).startswith("."))
        else:
            files += sorted(glob.glob(s)) or ([s] if os.path.exists(s) else [])
    if files:
        builder = format or _builder_for(files)
        return datasets.load_dataset(builder, data_files={split: files}, split=split,
                                     streaming=streaming, **kwargs)
    first = str(sources[0])
    looks_like_path = (first.startswith((".", "/", "~")) or any(c in first for c in "*?[")
                       or os.path.splitext(first)[1].lower() in _BUILDERS)
    if len(sources) == 1 and not looks_like_path:  # a hub dataset name
        return datasets.load_dataset(first, name, split=split, streaming=streaming, **kwargs)
    raise FileNotFoundError(f"no data files match {[str(s) for s in sources]}; give existing "
                            "files, a glob, a directory, or a hub dataset name like 'org/name'")
