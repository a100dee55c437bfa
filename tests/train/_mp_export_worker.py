"""One process of the multi-process export test (run by test_cli.py).

argv: coordinator_port process_id run_dir out_dir result.json
Runs `kdjax export` as one of 2 processes and records how many HF directories it wrote.
"""

import json
import sys

import kdjax.models
from kdjax.cli import main

port, pid, run_dir, out, result = sys.argv[1:]
writes = []
save_pretrained = kdjax.models.save_pretrained


def counting_save_pretrained(*args, **kwargs):
    writes.append(str(args[1]))
    return save_pretrained(*args, **kwargs)


kdjax.models.save_pretrained = counting_save_pretrained
rc = main(["export", run_dir, "--out", out, "--num-processes", "2", "--process-id", pid,
           "--coordinator-address", f"localhost:{port}"])
with open(result, "w") as f:
    json.dump({"rc": rc, "writes": writes}, f)
sys.exit(rc)
