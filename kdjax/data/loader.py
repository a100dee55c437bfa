"""The step-indexed loader: `batch_at(step)` → global, batch-sharded `jax.Array`s.

Global sample k = step * B + i (i < B) is row `perm_e[k mod N]` of epoch e = k // N,
where `perm_e` is a permutation of the N rows seeded by (seed, e). So a batch is a pure
function of (seed, step, B, N): resuming needs only the step, and survives a change in
host count; within an epoch no row repeats or is skipped (a batch may straddle two
epochs). Each process reads only the rows its addressable devices hold (from the batch
sharding's device → index map) — token store then teacher store, each one batched read
(kdjax.storage's preadv + crc32c row reader; tensorstore for other layouts) — and builds
global arrays with `jax.make_array_from_process_local_data`. `iter_from(step)` prefetches
a few steps in a background thread; its errors are re-raised in the caller.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kdjax.sharding import logical_to_spec


class Loader:
    """Args:
      token_store: a `TokenStore` (anything with `.num_rows` and `.read(rows) -> dict`).
      global_batch_size: rows per step over all processes; must divide by the
        data-parallel size (mesh axes the "batch" logical axis maps to).
      seed: permutation seed.
      mesh: the device mesh.
      teacher_store: optional store with `.read(rows) -> dict`; its arrays join the batch
        with keys prefixed `teacher_` (same row indices).
      prefetch: steps `iter_from` prepares ahead in a background thread.
      shuffle: False reads rows in order (epoch permutation = identity).
      prefetch_nice: added to the prefetch thread's nice value (Linux; 0 = unchanged).
        When the training step runs on the same CPU cores (CPU backend), a lower-priority
        loader preempts XLA's worker threads less: real-loader step ÷ in-memory step in
        benchmarks/loader.py on 2 cores, median 1.064 at 0 (10 runs) vs 1.044 at 10 (6).
    """

    def __init__(self, token_store, *, global_batch_size: int, seed: int, mesh: Mesh,
                 teacher_store=None, prefetch: int = 2, shuffle: bool = True,
                 prefetch_nice: int = 10):
        self.store, self.teacher = token_store, teacher_store
        self.batch_size, self.seed, self.mesh = int(global_batch_size), int(seed), mesh
        self.prefetch, self.shuffle = max(1, int(prefetch)), shuffle
        self.prefetch_nice = int(prefetch_nice)
        self.num_rows = int(token_store.num_rows)
        if teacher_store is not None and hasattr(teacher_store, "num_rows") and (
                int(teacher_store.num_rows) != self.num_rows):
            raise ValueError(f"teacher store has {teacher_store.num_rows} rows but the token "
                             f"store has {self.num_rows}; it was computed for other data")
        spec = logical_to_spec(("batch",), mesh=mesh)
        self.sharding = NamedSharding(mesh, spec)
        axes = spec[0] if spec and spec[0] is not None else ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        self.data_parallel = int(np.prod([mesh.shape[a] for a in axes]))
        if self.batch_size < 1 or self.batch_size % self.data_parallel:
            raise ValueError(
                f"global_batch_size={self.batch_size} is not divisible by the data-parallel "
                f"size {self.data_parallel} (mesh axes {axes} of {dict(mesh.shape)}); use a "
                f"multiple of {self.data_parallel}")
        # which positions of the global batch this process holds, in global order
        index_map = self.sharding.addressable_devices_indices_map((self.batch_size,))
        spans = sorted({(s[0].start or 0, self.batch_size if s[0].stop is None else s[0].stop)
                        for s in index_map.values()})
        self.local_positions = np.concatenate([np.arange(a, b) for a, b in spans])
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._perm_lock = threading.Lock()
        self._thread: _Prefetcher | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        with self._perm_lock:  # the prefetch thread and the caller may both ask
            if epoch not in self._perms:
                self._perms[epoch] = (
                    np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                    if self.shuffle else np.arange(self.num_rows))
                while len(self._perms) > 2:
                    self._perms.popitem(last=False)
            return self._perms[epoch]

    def rows_at(self, step: int) -> np.ndarray:
        """Global row indices `[global_batch_size]` int64 of `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, idx = k // self.num_rows, k % self.num_rows
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[idx[sel]]
        return out

    @property
    def steps_per_epoch(self) -> float:
        """N / B: steps for one pass over the rows (a float; batches straddle epochs)."""
        return self.num_rows / self.batch_size

    def local_batch(self, step: int, *, mask_wrapped: bool = False) -> dict[str, np.ndarray]:
        """This process's rows of `step` as NumPy arrays (`[local rows, ...]`). With
        `mask_wrapped`, rows past the end of epoch 0 get loss_mask False (for eval)."""
        positions = step * self.batch_size + self.local_positions
        rows = self.rows_at(step)[self.local_positions]
        # One store after the other, on this thread: the reads are many short syscalls
        # (GIL released) between crc32c calls (GIL held: google-crc32c releases it only
        # for bytes >= 1 MiB), and reading the teacher store on a second thread made
        # `local_batch` slower and cost more CPU on a 2-core host (GIL
        # hand-offs). `iter_from` already overlaps reading with the training step.
        batch = dict(self.store.read(rows))
        if self.teacher is not None:
            for k, v in self.teacher.read(rows).items():
                batch[f"teacher_{k}"] = v
        if mask_wrapped and "loss_mask" in batch:
            batch["loss_mask"] = batch["loss_mask"] & (positions < self.num_rows)[:, None]
        return batch

    def batch_at(self, step: int, *, mask_wrapped: bool = False) -> dict[str, jax.Array]:
        """The global batch of `step`: {key: jax.Array [global_batch_size, ...]} sharded
        over the "batch" logical axis."""
        local = self.local_batch(step, mask_wrapped=mask_wrapped)
        shapes = {k: (self.batch_size, *v.shape[1:]) for k, v in local.items()}
        return jax.make_array_from_process_local_data(self.sharding, local, shapes)

    def iter_from(self, step: int = 0):
        """Yields `batch_at(step)`, `batch_at(step + 1)`, … prepared ahead by a background
        thread. Starting a new iteration stops the previous one."""
        self.close()
        self._thread = _Prefetcher(self.batch_at, step, self.prefetch, self.prefetch_nice)
        return self._thread

    def eval_batches(self):
        """One pass over every row (use `shuffle=False` for a fixed order): ceil(N / B)
        batches; rows of the last batch that wrap around to the start have loss_mask
        False, so token-weighted sums count every row exactly once."""
        for step in range(-(-self.num_rows // self.batch_size)):
            yield self.batch_at(step, mask_wrapped=True)

    def close(self) -> None:
        """Stops the prefetch thread. The loader stays usable (`batch_at`, `iter_from`)."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lower_priority(nice: int) -> None:
    """Raises the calling thread's nice value by `nice` (Linux: per-thread priorities;
    elsewhere, or if refused, nothing)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Prefetcher:
    """Iterator over `make(step)` for step = start, start+1, … computed by a daemon thread
    `depth` steps ahead. An exception in the thread is raised by `next()`."""

    def __init__(self, make, start: int, depth: int, nice: int = 0):
        self._make, self._queue, self._nice = make, queue.Queue(maxsize=depth), nice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True,
                                        name="kdjax-loader-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, step: int) -> None:
        _lower_priority(self._nice)
        while not self._stop.is_set():
            try:
                item = self._make(step)
            except BaseException as e:  # handed to the consumer, which re-raises it
                self._put(_Failure(e))
                return
            if not self._put(item):
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's prefetch thread died") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        while not self._queue.empty():
            self._queue.get_nowait()
