"""One process of the multi-process loader test (run by test_multiprocess.py).

argv: coordinator_port process_id num_processes token_store teacher_store out.npz
Each process has 2 CPU devices (XLA_FLAGS set by the parent). It builds the loader on
the global 4-device mesh, gathers each global batch across processes, and (process 0)
saves them; every process also saves which batch positions it read itself.
"""

import sys

import jax

port, pid, nproc, store_path, teacher_path, out = sys.argv[1:]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=int(nproc), process_id=int(pid),
                           initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from kdjax.data import Loader, open_token_store  # noqa: E402
from kdjax.sharding import make_mesh  # noqa: E402
from kdjax.storage import open_row_store  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
loader = Loader(open_token_store(store_path), global_batch_size=8, seed=11, mesh=make_mesh(),
                teacher_store=open_row_store(teacher_path), prefetch=2)
saved = {"local_positions": loader.local_positions}
it = loader.iter_from(2)
for step in (2, 3, 4):
    batch = next(it)
    full = multihost_utils.process_allgather(batch, tiled=True)
    for k, v in full.items():
        saved[f"{step}/{k}"] = np.asarray(v)
loader.close()
np.savez(out, **saved)
jax.distributed.shutdown()
