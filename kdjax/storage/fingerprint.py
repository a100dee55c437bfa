"""Content fingerprints: sha256 hex digests of canonical JSON, bytes and files.

Fingerprints identify what a store was built from (tokenizer, data, teacher, plan) so a
reader can refuse a store that does not match its run. They are stable across Python
versions and dict orderings because JSON is canonicalised (sorted keys, no whitespace).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_BLOCK = 1 << 20


def canonical_json(obj) -> str:
    """`obj` as canonical JSON: sorted keys, compact separators, ASCII only. NumPy
    scalars/arrays and tuples are converted; NaN/Infinity are refused (not JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False, default=_to_jsonable)


def _to_jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"cannot fingerprint object of type {type(x).__name__}: {x!r}; pass "
                    "JSON-compatible values (dict, list, str, int, float, bool, None)")


def fingerprint_json(obj) -> str:
    """sha256 hex of `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def fingerprint_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """sha256 hex of raw bytes (a NumPy array is hashed with its dtype and shape)."""
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(f"{data.dtype.str}{list(data.shape)}".encode())
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    h.update(memoryview(data))
    return h.hexdigest()


def fingerprint_file(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: Iterable[str | os.PathLike], *,
                      root: str | os.PathLike | None = None) -> str:
    """sha256 hex over several files: each file's name (relative to `root` when given,
    else its base name) and content digest, in sorted order of names, so the result does
    not depend on where the files live or the order they are listed in."""
    entries = []
    for p in paths:
        p = Path(p)
        name = p.relative_to(root).as_posix() if root is not None else p.name
        entries.append([name, fingerprint_file(p)])
    return fingerprint_json(sorted(entries))


def fingerprint_dir(path: str | os.PathLike, *, patterns: Iterable[str] = ("*",)) -> str:
    """sha256 hex over the regular files under `path` matching any glob in `patterns`
    (recursive, hidden files skipped), names relative to `path`."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"cannot fingerprint directory {str(root)!r}: it does not "
                                "exist or is not a directory")
    files = {f for pat in patterns for f in root.rglob(pat)
             if f.is_file() and not any(part.startswith(".")
                                        for part in f.relative_to(root).parts)}
    return fingerprint_files(sorted(files), root=root)
