"""An exclusive writer lock on a store directory (fcntl.flock on a lock file).

The kernel releases a flock when its holder dies, so a lock left by a kill -9'd writer is
never stale: the next writer simply takes it. Locks are per host and per (local or NFSv4)
filesystem; writers on different hosts of a shared store need disjoint `name`s (e.g. one
per process index) and coordinate shards through the ledger.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class WriterLock:
    """`with WriterLock(store_dir): ...` — holds `<store_dir>/.<name>.lock` exclusively.

    Args:
      store_dir: the store directory (created if absent).
      name: lock name; processes of one multi-process writer each use their own
        (e.g. `f"writer-{jax.process_index()}"`) so they do not refuse each other, while
        a second job with the same process index is refused.

    Raises:
      StoreLockedError: another live process holds the lock (its pid/host are named).
    """

    def __init__(self, store_dir: str | os.PathLike, name: str = "writer"):
        self.path = Path(store_dir) / f".{name}.lock"
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        from kdjax.storage.errors import StoreLockedError

        if self._fd is not None:
            raise RuntimeError(f"lock {str(self.path)!r} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"store {str(self.path.parent)!r} is being written by another process "
                f"({holder}); wait for it to finish or stop it — two writers on one store "
                "are refused") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
