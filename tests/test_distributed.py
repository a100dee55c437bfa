"""kdjax.distributed in one process: the primary-writes helpers run the writer directly and
start no backend (the multi-process behaviour is tested in tests/data/test_multiprocess.py)."""

import subprocess
import sys

import pytest

from kdjax import distributed


def test_one_process_runs_the_writer_directly():
    calls = []

    def write(x, *, y):
        calls.append((x, y))
        # nested sections and barriers run directly too
        return distributed.on_primary("inner", lambda: (x, y)), distributed.barrier("in")

    # no JSON round trip in one process: a tuple stays a tuple
    assert distributed.on_primary("outer", write, 1, y=2) == ((1, 2), None)
    assert calls == [(1, 2)]
    distributed.barrier("alone")
    assert distributed.process_count() == 1 and distributed.is_primary()


def test_an_error_of_the_writer_is_raised_as_it_is():
    def fail():
        raise ValueError("bad value 7")

    with pytest.raises(ValueError, match="bad value 7"):
        distributed.on_primary("boom", fail)
    assert distributed._depth == 0  # the section was left


def test_primary_writes_keeps_the_function():
    @distributed.primary_writes("sum")
    def add(a, b=2):
        """Adds."""
        return a + b

    assert add(1) == 3 and add(1, b=5) == 6
    assert add.__name__ == "add" and add.__doc__ == "Adds."


def test_counting_processes_starts_no_backend():
    """`kdjax pack` on a GPU host must not claim the GPU: without jax.distributed and with
    no backend up, the process is alone and nothing is started."""
    code = ("from jax._src import xla_bridge\n"
            "from kdjax import distributed as d\n"
            "assert (d.process_count(), d.process_index(), d.is_primary()) == (1, 0, True)\n"
            "assert d.on_primary('x', lambda: 5) == 5\n"
            "d.barrier('x')\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_num_processes_needs_the_other_settings():
    import argparse

    args = argparse.Namespace(num_processes=2, process_id=None, coordinator_address=None,
                              distributed=False)
    with pytest.raises(SystemExit, match="--num-processes needs --process-id"):
        distributed.initialize_from_args(args)
