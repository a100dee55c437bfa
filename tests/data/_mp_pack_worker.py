"""One process of the multi-process pack test (run by test_multiprocess.py).

argv: coordinator_port process_id num_processes corpus tokenizer_dir out_dir result.json
Both processes call `build_token_store` on the same output directory; the result file
records the summary each returned, how many splits each wrote, what each saw when the
primary failed, and the same through the device-collective fallback.
"""

import argparse
import json
import sys

port, pid, nproc, corpus, tokenizer, out, result = sys.argv[1:]

from kdjax import distributed  # noqa: E402

distributed.initialize_from_args(argparse.Namespace(
    num_processes=int(nproc), process_id=int(pid), coordinator_address=f"localhost:{port}",
    distributed=False))

from kdjax.data import build  # noqa: E402

writes = []
write_split = build._write_split


def counting_write_split(docs, indices, path, **kw):
    writes.append(path.name)
    return write_split(docs, indices, path, **kw)


build._write_split = counting_write_split
saved = {"summary": build.build_token_store(
    corpus, tokenizer, out, seq_len=32, eval_fraction=0.1, seed=3, shard_rows=8,
    progress=False, cache_dir=f"{out}-hf-cache"), "writes": writes}


def fail():
    raise ValueError("bad value 7; pass 8")


def check_errors_and_results(tag):
    """An error on the primary reaches every process; results reach every process."""
    try:
        distributed.on_primary("boom", fail)
    except Exception as e:  # noqa: BLE001  (recorded for the test to check)
        saved[f"{tag}/error"] = f"{type(e).__name__}: {e}"
    distributed.barrier(f"{tag}-after-error")
    saved[f"{tag}/result"] = distributed.on_primary("answer", lambda: {"rank": int(pid)})


check_errors_and_results("service")
# the device-collective fallback (several processes but no coordination service)
import jax  # noqa: E402

jax.devices()  # the fallback runs where a backend runs
service = distributed._service
distributed._service = lambda: type("NoClient", (), {"client": None})()
check_errors_and_results("collectives")
distributed._service = service
with open(result, "w") as f:
    json.dump(saved, f)
jax.distributed.shutdown()
