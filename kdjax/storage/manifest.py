"""Atomic JSON files and store manifests.

A file is written to a temporary sibling, flushed and fsync'ed, renamed over the target
and the directory fsync'ed, so a reader (or a crash, or kill -9) sees either the old
file or the new one, never a torn one. A store's `manifest.json` has `complete: false`
while a writer works and is rewritten with `complete: true` as the writer's last act;
readers refuse a store whose manifest is missing or incomplete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kdjax.storage.errors import StoreCorruptError, StoreIncompleteError
from kdjax.storage.fingerprint import _to_jsonable

MANIFEST_NAME = "manifest.json"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; when the block ends it is fsynced
    and renamed over `path` and the directory fsynced (on an error it is deleted), so a
    reader or a crash sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Writes `obj` as indented JSON to `path` atomically (`atomic_path`)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_to_jsonable)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Reads a JSON object; a missing file raises FileNotFoundError, bad JSON a
    StoreCorruptError naming the file."""
    path = Path(path)
    text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{str(path)!r} is not valid JSON ({e}); the file is "
                                "damaged — rebuild the store") from None
    if not isinstance(obj, dict):
        raise StoreCorruptError(f"{str(path)!r} holds a {type(obj).__name__}, expected a "
                                "JSON object; the file is damaged — rebuild the store")
    return obj


def write_manifest(store_dir: str | os.PathLike, manifest: dict) -> None:
    """Atomically writes `<store_dir>/manifest.json`. Set `complete` last, on its own."""
    if "complete" not in manifest:
        raise ValueError("a manifest must say whether the store is complete: set "
                         "manifest['complete'] = False while writing, True at the end")
    write_json_atomic(Path(store_dir) / MANIFEST_NAME, manifest)


def read_manifest(store_dir: str | os.PathLike, *, require_complete: bool = True) -> dict:
    """Reads `<store_dir>/manifest.json`.

    Raises:
      StoreIncompleteError: no manifest, or (with `require_complete`) `complete` is not true.
    """
    path = Path(store_dir) / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not Path(store_dir).exists() else "has no manifest.json"
        raise StoreIncompleteError(
            f"store {str(store_dir)!r} {what}: it was never written, or its writer was "
            "interrupted before it started; build it (or re-run the writer to resume)")
    manifest = read_json(path)
    if require_complete and manifest.get("complete") is not True:
        raise StoreIncompleteError(
            f"store {str(store_dir)!r} is incomplete (manifest complete="
            f"{manifest.get('complete')!r}): its writer was interrupted or is still "
            "running; re-run the same command to resume it, then read it")
    return manifest
