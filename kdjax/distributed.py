"""Multi-process start-up shared by the CLI commands that run on every host."""

from __future__ import annotations

import argparse


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """`--distributed` (auto-detected: TPU pods, SLURM) or explicit process settings."""
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() with auto-detected settings")
    parser.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int, help="processes in the job")
    parser.add_argument("--process-id", type=int, help="this process's index")


def initialize_from_args(args: argparse.Namespace) -> None:
    """Calls jax.distributed.initialize as the arguments ask (nothing when single-process)."""
    import jax

    if args.num_processes is not None:
        if args.coordinator_address is None or args.process_id is None:
            raise SystemExit("--num-processes needs --process-id and --coordinator-address")
        # CPU processes need a collectives backend for cross-process reductions and barriers
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()
