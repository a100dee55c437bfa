"""The step-indexed loader: purity/resume, epoch coverage, sharding, teacher join,
prefetch errors and shutdown, refusal of bad stores and batch sizes."""

import os
import threading

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax.data import Loader, open_token_store
from kdjax.sharding import make_mesh
from kdjax.storage import StoreCorruptError

B = 8


def as_numpy(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_resume_from_any_step_equals_uninterrupted(store, mesh):
    with Loader(store, global_batch_size=B, seed=7, mesh=mesh) as loader:
        it = loader.iter_from(0)
        straight = [as_numpy(next(it)) for _ in range(12)]
    for start in (0, 5, 11):
        with Loader(store, global_batch_size=B, seed=7, mesh=mesh, prefetch=3) as fresh:
            resumed = fresh.iter_from(start)
            for step in range(start, 12):
                got = as_numpy(next(resumed))
                for k in straight[step]:
                    np.testing.assert_array_equal(got[k], straight[step][k])
    other = Loader(store, global_batch_size=B, seed=8, mesh=mesh).rows_at(0)
    assert not np.array_equal(other, Loader(store, global_batch_size=B, seed=7,
                                            mesh=mesh).rows_at(0))


def test_each_epoch_is_a_permutation(store, mesh):
    n = store.num_rows
    loader = Loader(store, global_batch_size=B, seed=1, mesh=mesh)
    steps = -(-3 * n // B)
    rows = np.concatenate([loader.rows_at(s) for s in range(steps)])
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))  # no duplicate, no skip
    assert not np.array_equal(epochs[0], epochs[1])
    ordered = Loader(store, global_batch_size=B, seed=1, mesh=mesh, shuffle=False)
    np.testing.assert_array_equal(ordered.rows_at(1), np.arange(B, 2 * B) % n)


def test_batch_content_sharding_and_dtypes(store, mesh):
    loader = Loader(store, global_batch_size=B, seed=2, mesh=mesh)
    batch = loader.batch_at(3)
    expect = store.read(loader.rows_at(3))
    assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    for k, v in batch.items():
        assert v.shape == (B, store.seq_len) and v.dtype == expect[k].dtype
        assert v.sharding.spec == P("data")
        for shard in v.addressable_shards:  # each device holds exactly its rows
            np.testing.assert_array_equal(np.asarray(shard.data), expect[k][shard.index])
    assert jax.jit(lambda b: (b["tokens"] * b["loss_mask"]).sum())(batch) == (
        expect["tokens"] * expect["loss_mask"]).sum()


def test_teacher_rows_join_the_batch(store, mesh, teacher):
    loader = Loader(store, global_batch_size=B, seed=4, mesh=mesh, teacher_store=teacher)
    batch, rows = loader.batch_at(2), loader.rows_at(2)
    expect = teacher.read(rows)
    assert {"teacher_ids", "teacher_counts", "tokens"} <= set(batch)
    for k in ("ids", "counts"):
        assert batch[f"teacher_{k}"].shape == (B, store.seq_len, 4)
        np.testing.assert_array_equal(np.asarray(batch[f"teacher_{k}"]), expect[k])


def test_batch_size_must_divide_data_parallel_size(store):
    with pytest.raises(ValueError, match=r"global_batch_size=6 .* data-parallel size 8"):
        Loader(store, global_batch_size=6, seed=0, mesh=make_mesh())
    with pytest.raises(ValueError, match=r"global_batch_size=4 .* size 8"):
        Loader(store, global_batch_size=4, seed=0, mesh=make_mesh(data=4, fsdp=2))
    loader = Loader(store, global_batch_size=2, seed=0, mesh=make_mesh(data=2, tensor=4))
    assert loader.batch_at(0)["tokens"].shape == (2, store.seq_len)


class Flaky:
    """A store whose read fails on the rows of one step."""

    def __init__(self, store, bad_rows):
        self.store, self.num_rows, self.bad = store, store.num_rows, set(bad_rows.tolist())

    def read(self, rows):
        if self.bad & set(rows.tolist()):
            raise OSError("disk on fire")
        return self.store.read(rows)


def test_prefetch_errors_reach_the_caller_and_shutdown_is_clean(store, mesh):
    rows3 = Loader(store, global_batch_size=B, seed=9, mesh=mesh).rows_at(3)
    loader = Loader(Flaky(store, rows3[:1]), global_batch_size=B, seed=9, mesh=mesh)
    it = loader.iter_from(0)
    for _ in range(3):
        next(it)
    with pytest.raises(OSError, match="disk on fire"):
        next(it)
    loader.close()
    it = loader.iter_from(5)  # a consumer that stops early
    next(it)
    loader.close()
    assert not any(t.name == "kdjax-loader-prefetch" and t.is_alive()
                   for t in threading.enumerate())


def test_corrupted_and_truncated_stores_give_clear_errors(token_stores, tmp_path, mesh):
    import shutil

    path = tmp_path / "train"
    shutil.copytree(os.path.join(token_stores[0], "train"), path)
    chunk = path / "arrays" / "records" / "c" / "0" / "0"  # the token store's row records
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF  # first row
    chunk.write_bytes(bytes(data))
    loader = Loader(open_token_store(path), global_batch_size=B, seed=0, mesh=mesh,
                    shuffle=False)
    with pytest.raises(StoreCorruptError, match=r"DATA_LOSS.*records \(holding .*tokens.*\)"
                                                r".*shard 0, rows \[0, 8\)"):
        loader.batch_at(0)
    os.remove(path / "arrays" / "records" / "c" / "1" / "0")  # a lost shard file
    with pytest.raises(StoreCorruptError, match=r"NOT_FOUND.*'records.*shard 1, rows \[8, 16"):
        loader.batch_at(1)
    assert len(open_token_store(path).check()) == 2
    with open(path / "manifest.json") as f:
        text = f.read()
    (path / "manifest.json").write_text(text.replace('"num_rows": ', '"num_rows": 1'))
    with pytest.raises(StoreCorruptError, match="truncated"):
        open_token_store(path)


def test_eval_batches_count_every_row_once(store, mesh):
    bs = next(b for b in (24, 40, 56, 72) if store.num_rows % b)  # the last batch wraps
    loader = Loader(store, global_batch_size=bs, seed=0, mesh=mesh, shuffle=False)
    batches = [as_numpy(b) for b in loader.eval_batches()]
    assert len(batches) == -(-store.num_rows // bs)
    got = sum(int(b["loss_mask"].sum()) for b in batches)
    assert got == int(store.read(np.arange(store.num_rows))["loss_mask"].sum())


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread nice is Linux-only")
@pytest.mark.parametrize("nice", [0, 10])
def test_prefetch_thread_runs_at_lower_priority(store, mesh, nice):
    """Only the prefetch thread is reniced; the caller's priority is untouched."""
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}
    with Loader(store, global_batch_size=B, seed=0, mesh=mesh, prefetch_nice=nice) as loader:
        make = loader.batch_at

        def spy(step):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return make(step)

        loader.batch_at = spy
        next(loader.iter_from(0))
    assert seen["nice"] == min(19, me + nice)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
