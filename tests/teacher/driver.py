"""Subprocess driver for the kill -9 and multi-process tests: precompute with the tiny
teacher built in process (no checkpoint, no transformers import — fast start).

    python -m tests.teacher.driver CONFIG_JSON [--delay S]
        [--coordinator HOST:PORT --num-processes P --process-id I]

`--delay` makes every shard write take S seconds longer, so a test can kill -9 the
writer between two committed shards.
"""

import argparse
import json
import time

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()

    import jax

    if args.num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from kdjax.storage.rowstore import RowStoreWriter
    from kdjax.teacher import PrecomputeConfig, precompute
    from tests.teacher import helpers

    if args.delay:
        write_shard = RowStoreWriter.write_shard

        def slow_write_shard(self, *a, **kw):
            write_shard(self, *a, **kw)
            time.sleep(args.delay)

        RowStoreWriter.write_shard = slow_write_shard
    with open(args.config) as f:
        config = PrecomputeConfig.from_dict(json.load(f))
    precompute(config, model=helpers.tiny_decoder())
    jax.distributed.shutdown() if args.num_processes else None
