"""Errors raised by kdjax stores. Each message names the store, the array and what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Base class: something is wrong with a store on disk."""


class StoreIncompleteError(StoreError):
    """The store has no manifest, or its manifest says `complete: false` (a writer was
    interrupted, or is still running). Re-run the writer to resume it."""


class StoreCorruptError(StoreError):
    """A chunk is missing, truncated or fails its crc32c check (DATA_LOSS)."""


class StoreLockedError(StoreError):
    """Another writer holds the store's writer lock."""


class StoreMismatchError(StoreError, ValueError):
    """A store does not match what the caller needs (fingerprint, shape, dtype, plan)."""
