"""Multi-process start-up, and the one rule for shared outputs: the primary process
writes, the others wait.

Commands that run on every host (`kdjax pack`, `precompute`, `train`, `eval`, `export`)
start JAX's distributed runtime with `initialize_from_args`. An output that all processes
share (a packed token store, a Hugging Face export, a store's manifest, a report) is
written by one process: `on_primary(name, fn)` runs `fn` on process 0 while the others
wait, and every process returns its result (or raises its error). `barrier(name)` is the
bare wait. Both are no-ops in a single process.

Waiting goes through JAX's coordination service (the key-value store and barriers of
`jax.distributed`, as Orbax's multi-host sync does), not a device collective: it holds no
accelerator, has a timeout long enough for a whole `pack` (`WAIT_S`), carries the
primary's result and error, and starts no backend (`kdjax pack` on a GPU host must not
claim the GPU). Where several processes exist without that service (a backend that forms
the job by itself), device collectives (`jax.experimental.multihost_utils`) stand in.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable
from typing import Any

import numpy as np

# How long the other processes wait for the primary: a pack of a large corpus runs on one
# process and can take hours.
WAIT_S = 24 * 3600

_calls = itertools.count()  # names the waits: every process makes the same calls in order
_depth = 0  # > 0 inside an `on_primary` section, which only the primary runs


class PrimaryFailedError(RuntimeError):
    """Raised on the other processes when the primary process failed in `on_primary`."""


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """`--distributed` (auto-detected: TPU pods, SLURM) or explicit process settings."""
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() with auto-detected settings")
    parser.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, help="processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index")


def initialize_from_args(args: argparse.Namespace) -> None:
    """Calls jax.distributed.initialize as the arguments ask (nothing when single-process)."""
    if args.num_processes is not None:
        if args.coordinator_address is None or args.process_id is None:
            raise SystemExit("--num-processes needs --process-id and --coordinator-address")
        initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.distributed:
        import jax

        jax.distributed.initialize()


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               **kwargs) -> None:
    """`jax.distributed.initialize` with explicit settings, CPU collectives enabled."""
    import jax

    # CPU processes need a collectives backend for cross-process reductions
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)


def _service():
    """JAX's distributed state (client None when jax.distributed is not initialized).
    Private API: the public one has no key-value store; Orbax reads it the same way."""
    from jax._src import distributed

    return distributed.global_state


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def process_count() -> int:
    """Processes in the job. Starts no backend when jax.distributed is not initialized
    and none runs yet: such a process is alone."""
    return _process_info("num_processes", "process_count", alone=1)


def process_index() -> int:
    """This process's index (0 = the primary), without starting a backend (see above)."""
    return _process_info("process_id", "process_index", alone=0)


def _process_info(service_field: str, jax_fn: str, *, alone: int) -> int:
    """From the distributed service when initialized, else from a running backend, else
    `alone` (no backend is started just to ask)."""
    state = _service()
    if state.client is not None:
        return int(getattr(state, service_field))
    if not _backend_started():
        return alone
    import jax

    return int(getattr(jax, jax_fn)())


def is_primary() -> bool:
    """Whether this process writes shared outputs (process 0)."""
    return process_index() == 0


def barrier(name: str, *, timeout_s: float = WAIT_S) -> None:
    """Waits until every process reaches `barrier(name)`. Every process must make the same
    sequence of `barrier` / `on_primary` calls. A no-op in one process and inside an
    `on_primary` section (only the primary runs there)."""
    if _depth or process_count() == 1:
        return
    wait = f"kdjax/{name}/{next(_calls)}"
    client = _service().client
    if client is not None:
        client.wait_at_barrier(wait, int(timeout_s * 1000))
    else:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(wait)


def on_primary(name: str, fn: Callable[..., Any], *args, timeout_s: float = WAIT_S,
               **kwargs) -> Any:
    """Runs `fn(*args, **kwargs)` on the primary process only; the others wait for it.

    In a multi-process job every process returns the primary's result after a JSON round
    trip (so all return equal values: tuples become lists, keys strings), and an error on
    the primary is raised there as it is and on the others as `PrimaryFailedError` with
    its message. Every process must make the same sequence of `on_primary` / `barrier`
    calls (their order names the waits). Sections nest: inside `fn`, a further
    `on_primary` runs `fn` directly and `barrier` returns at once.

    Args:
      name: what the primary writes, for wait names and errors (e.g. "pack").
      fn: the writer; its result must be JSON-serializable (a summary) or None.
      timeout_s: how long the others wait (coordination service only).
    Returns:
      `fn`'s result, on every process.
    """
    if _depth or process_count() == 1:
        return _section(fn, args, kwargs)
    key = f"kdjax/{name}/{next(_calls)}"
    if is_primary():
        try:
            result = _section(fn, args, kwargs)
            message = json.dumps({"result": result})
        except BaseException as e:
            _publish(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        _publish(key, message)
        return json.loads(message)["result"]
    message = json.loads(_receive(key, timeout_s))
    if "error" in message:
        raise PrimaryFailedError(f"the primary process (0) failed while writing {name}: "
                                 f"{message['error']} (its log has the traceback)")
    return message["result"]


def primary_writes(name: str) -> Callable:
    """Decorator: every call of the function runs through `on_primary(name, …)`."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            return on_primary(name, fn, *args, **kwargs)
        return run
    return wrap


def _section(fn, args, kwargs):
    global _depth
    _depth += 1
    try:
        return fn(*args, **kwargs)
    finally:
        _depth -= 1


def _publish(key: str, text: str) -> None:
    client = _service().client
    if client is not None:
        client.key_value_set(key, text)
    else:
        _broadcast_text(text)


def _receive(key: str, timeout_s: float) -> str:
    client = _service().client
    if client is not None:
        return client.blocking_key_value_get(key, int(timeout_s * 1000))
    return _broadcast_text(None)


def _broadcast_text(text: str | None) -> str:
    """The primary's `text` on every process, through device collectives (the others pass
    None): its length first, since every process must pass arrays of one shape."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8) if text is not None else None
    n = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    buf = data if data is not None else np.zeros(n, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)).decode()
