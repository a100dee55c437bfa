"""A shard ledger for resumable writers.

A writer splits its rows into shards, writes a whole shard, and only then records it
here (one small marker file per shard, written atomically), so a shard in the ledger is
always fully on disk. After a crash or kill -9 a rerun asks `missing()` and redoes only
those shards; a shard that was half-written is simply written again. Marker files keep
concurrent processes that write disjoint shards from contending on one file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kdjax.storage.manifest import read_json, write_json_atomic

LEDGER_DIR = "ledger"
_MARKER = re.compile(r"^shard-(\d+)\.json$")


class ShardLedger:
    """Records which of `num_shards` shards of a store are committed.

    Args:
      store_dir: the store directory; markers live in `<store_dir>/ledger/`.
      num_shards: total number of shards the writer will produce.
    """

    def __init__(self, store_dir: str | os.PathLike, num_shards: int):
        if num_shards < 0:
            raise ValueError(f"num_shards must be >= 0, got {num_shards}")
        self.dir = Path(store_dir) / LEDGER_DIR
        self.num_shards = int(num_shards)

    def _marker(self, shard: int) -> Path:
        return self.dir / f"shard-{shard:06d}.json"

    def _check(self, shard: int) -> int:
        shard = int(shard)
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is out of range [0, {self.num_shards})")
        return shard

    def record(self, shard: int, info: dict | None = None) -> None:
        """Marks `shard` committed. Call only after its data is fully written."""
        shard = self._check(shard)
        write_json_atomic(self._marker(shard), {"shard": shard, **(info or {})})

    def info(self, shard: int) -> dict:
        """The info dict recorded for `shard` (KeyError if not recorded)."""
        path = self._marker(self._check(shard))
        if not path.is_file():
            raise KeyError(f"shard {shard} is not recorded in {str(self.dir)!r}")
        return read_json(path)

    def done(self) -> set[int]:
        """Shards recorded so far."""
        if not self.dir.is_dir():
            return set()
        out = set()
        for name in os.listdir(self.dir):
            m = _MARKER.match(name)
            if m and int(m.group(1)) < self.num_shards:
                out.add(int(m.group(1)))
        return out

    def missing(self) -> list[int]:
        """Shards not yet recorded, ascending."""
        done = self.done()
        return [s for s in range(self.num_shards) if s not in done]

    def is_complete(self) -> bool:
        return not self.missing()

    def clear(self) -> None:
        """Forgets every recorded shard (used when a store is rebuilt from scratch)."""
        if self.dir.is_dir():
            for name in os.listdir(self.dir):
                if _MARKER.match(name):
                    (self.dir / name).unlink()
