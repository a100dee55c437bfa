"""Writing whole shards on a background thread, so disk I/O overlaps teacher compute.

`ShardAssembler` collects the host-side outputs of the steps of one shard and, once the
shard is full, hands it to `BackgroundWriter`, whose thread writes it through
`RowStoreWriter.write_shard` (all arrays, durably, then the ledger marker). The queue is
bounded so a slow disk applies back-pressure instead of filling host memory.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np


class BackgroundWriter:
    """`submit(shard, data, info)` returns at once; `close()` waits and re-raises errors.

    Args:
      write_shard: `RowStoreWriter.write_shard`-like callable (shard, data, info).
      max_pending: shards queued at most before `submit` blocks.
    """

    def __init__(self, write_shard: Callable, *, max_pending: int = 2):
        self._write = write_shard
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self.shards_written = 0
        self.seconds_writing = 0.0
        self._thread = threading.Thread(target=self._run, name="kdjax-shard-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain; the error is raised by submit/close
            try:
                t0 = time.perf_counter()
                self._write(*item)
                self.seconds_writing += time.perf_counter() - t0
                self.shards_written += 1
            except BaseException as e:  # re-raised on the main thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a teacher-store shard failed: {err}") from err

    def submit(self, shard: int, data: dict, info: dict) -> None:
        self._raise()
        self._queue.put((shard, data, info))

    def close(self) -> None:
        """Waits for every queued shard to be written; raises the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: stop the thread, keep the original error
            self._error = self._error or exc_type
            self._queue.put(None)
            self._thread.join()


class ShardAssembler:
    """Collects the per-step host outputs `{name: [n_valid, ...]}` of one shard."""

    def __init__(self, shard: int, num_rows: int):
        self.shard, self.num_rows = shard, num_rows
        self._parts: dict[str, list[np.ndarray]] = {}
        self.rows = 0

    def add(self, outputs: dict[str, np.ndarray], n_valid: int) -> None:
        for name, value in outputs.items():
            self._parts.setdefault(name, []).append(np.asarray(value)[:n_valid])
        self.rows += n_valid

    @property
    def full(self) -> bool:
        return self.rows >= self.num_rows

    def parts(self) -> dict[str, list[np.ndarray]]:
        """{name: the steps' arrays}, whose concatenation along rows is the shard. Not
        concatenated: `RowStoreWriter.write_shard` writes parts as they are (a dense-logits
        shard is ~16 MB per row; a concatenation would copy it into fresh pages)."""
        if self.rows != self.num_rows:
            raise RuntimeError(f"shard {self.shard} got {self.rows} rows, expected "
                               f"{self.num_rows}")
        return {name: list(parts) for name, parts in self._parts.items()}
