"""The generated dataset writer: atomic shards, ledger resume, plan checks, read back."""

import numpy as np
import pytest

from kdjax.generate.dataset import (
    GeneratedDataset,
    GeneratedWriter,
    is_generated,
    shard_path,
)
from kdjax.storage.errors import StoreIncompleteError, StoreMismatchError

PLAN = {"model_fingerprint": "m", "tokenizer_fingerprint": "t", "n": 2, "seed": 0}


def _records(shard, rng):
    out = []
    for e in range(3):
        for s in range(2):
            ids = rng.integers(0, 100, rng.integers(1, 6)).tolist()
            lp = (-rng.random(len(ids))).astype(np.float32).tolist()
            out.append({"example_id": shard * 3 + e, "sample_index": s, "prompt": f"p{e}",
                        "completion": " ".join(map(str, ids)), "prompt_ids": [1, 2],
                        "completion_ids": ids, "finish_reason": "eos",
                        "logprobs": lp, "mean_logprob": float(np.mean(lp))})
    return out


def _write(root, shards, rng_seed=0, **kw):
    rng = np.random.default_rng(rng_seed)
    data = {i: _records(i, rng) for i in range(3)}
    w = GeneratedWriter(root, PLAN, 3, **kw)
    for i in shards:
        if i in w.missing():
            w.write_shard(i, data[i])
    return w, data


def test_resume_writes_only_missing_shards_and_ends_byte_identical(tmp_path):
    full, data = _write(tmp_path / "a", [0, 1, 2])
    full.finish({"records": 18})
    part, _ = _write(tmp_path / "b", [0])  # "killed" after one shard
    with pytest.raises(StoreIncompleteError):
        GeneratedDataset(tmp_path / "b")
    assert is_generated(tmp_path / "b")
    before = shard_path(tmp_path / "b", 0).stat().st_mtime_ns
    resumed, _ = _write(tmp_path / "b", [0, 1, 2])
    assert shard_path(tmp_path / "b", 0).stat().st_mtime_ns == before  # not rewritten
    resumed.finish({"records": 18})
    for i in range(3):
        assert shard_path(tmp_path / "a", i).read_bytes() == shard_path(tmp_path / "b",
                                                                        i).read_bytes()
    got = list(GeneratedDataset(tmp_path / "b").records())
    want = [r for i in range(3) for r in data[i]]
    assert len(got) == len(GeneratedDataset(tmp_path / "b")) == 18
    for g, w in zip(got, want):
        assert g["completion_ids"] == w["completion_ids"] and g["example_id"] == w["example_id"]
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=0)


def test_other_plan_is_refused_unless_overwrite(tmp_path):
    _write(tmp_path / "d", [0])
    with pytest.raises(StoreMismatchError, match=r"differing: seed.*--overwrite"):
        GeneratedWriter(tmp_path / "d", {**PLAN, "seed": 1}, 3)
    w = GeneratedWriter(tmp_path / "d", {**PLAN, "seed": 1}, 3, overwrite=True)
    assert w.missing() == [0, 1, 2] and not shard_path(tmp_path / "d", 0).exists()


def test_foreign_directory_and_bad_records_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="is not a generated dataset"):
        GeneratedWriter(tmp_path / "x", PLAN, 1)
    w = GeneratedWriter(tmp_path / "y", PLAN, 1)
    bad = _records(0, np.random.default_rng(1))
    bad[0]["finish_reason"] = "timeout"
    with pytest.raises(ValueError, match="finish_reason 'timeout'"):
        w.write_shard(0, bad)
    assert w.missing() == [0] and not shard_path(tmp_path / "y", 0).exists()
    with pytest.raises(RuntimeError, match="not written yet"):
        w.finish({})


def test_start_over_leaves_an_incomplete_dataset_until_every_shard_is_rewritten(tmp_path):
    # a curated copy is rewritten whole: a crash part-way must not read as the old copy
    full, data = _write(tmp_path / "c", [0, 1, 2])
    full.finish({"records": 18})
    assert len(GeneratedDataset(tmp_path / "c")) == 18
    again = GeneratedWriter(tmp_path / "c", PLAN, 3, overwrite=True).start_over()
    assert again.missing() == [0, 1, 2] and not shard_path(tmp_path / "c", 0).exists()
    again.write_shard(0, data[0][:2])  # "killed" after one rewritten shard
    with pytest.raises(StoreIncompleteError):
        GeneratedDataset(tmp_path / "c")
    again.write_shard(1, [])
    again.write_shard(2, data[2])
    again.finish({"records": 8})
    got = list(GeneratedDataset(tmp_path / "c").records())
    assert [r["example_id"] for r in got] == [r["example_id"] for r in data[0][:2] + data[2]]
