"""build_token_store / open_token_store: content, held-out split, formats, streaming,
resume after interruption, refusal of mismatches, the `kdjax pack` CLI."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kdjax.data import build_token_store, open_token_store
from kdjax.data.pack import fill_rows, plan_packing
from kdjax.data.tokenize import tokenizer_fingerprint
from kdjax.storage import RowStoreWriter, StoreIncompleteError, StoreMismatchError

from .conftest import make_tokenizer, write_jsonl


def reference_rows(texts, tokenizer, doc_ids, seq_len):
    """Independent packing of `texts[doc_ids]`: tokenize each document directly."""
    docs = {}
    for k, d in enumerate(doc_ids):
        ids = np.asarray(tokenizer(texts[d])["input_ids"] + [tokenizer.eos_token_id])
        docs[k] = (ids, np.ones(len(ids), bool))
    plan = plan_packing(np.array([len(docs[k][0]) for k in range(len(doc_ids))]), seq_len)
    return fill_rows(plan, 0, plan.num_rows, docs, seq_len)


def test_store_matches_reference_packing(token_stores, text_corpus, tokenizer):
    out, summary = token_stores
    with open(text_corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    perm = np.random.default_rng(3).permutation(len(texts))  # documented: seeded doc split
    n_eval = round(0.1 * len(texts))
    for split, doc_ids in (("train", np.sort(perm[n_eval:])), ("eval", np.sort(perm[:n_eval]))):
        store = open_token_store(out, split)
        ref = reference_rows(texts, tokenizer, doc_ids, 32)
        got = store.read(np.arange(store.num_rows))
        assert store.num_rows == len(ref["tokens"]) == summary[split]["rows"]
        for k in ("tokens", "segment_ids", "loss_mask"):
            np.testing.assert_array_equal(got[k], ref[k])
        assert {k: v.dtype for k, v in got.items()} == {
            "tokens": np.int32, "targets": np.int32, "loss_mask": bool,
            "segment_ids": np.int32, "positions": np.int32}
        assert store.seq_len == 32 and store.vocab_size == len(tokenizer)
        assert store.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
        assert store.manifest["num_tokens"] == int((ref["segment_ids"] > 0).sum())
        assert store.check() == []
    assert summary["train"]["fingerprint"] != summary["eval"]["fingerprint"]
    with pytest.raises(StoreIncompleteError, match="'train'"):
        open_token_store(out)  # the parent directory is not a store


def test_parquet_streaming_gives_the_same_store(token_stores, text_corpus, tokenizer, tmp_path,
                                                hf_cache):
    import datasets

    datasets.load_dataset("json", data_files=str(text_corpus), split="train",
                          cache_dir=hf_cache).to_parquet(
        str(tmp_path / "docs.parquet"))
    summary = build_token_store(str(tmp_path / "docs.parquet"), tokenizer, tmp_path / "s",
                                seq_len=32, eval_fraction=0.1, seed=3, shard_rows=16,
                                streaming=True, progress=False, cache_dir=hf_cache)
    for split in ("train", "eval"):  # same rows → same data fingerprint (layout-free)
        assert summary[split]["fingerprint"] == token_stores[1][split]["fingerprint"]


def test_interrupted_build_is_refused_then_resumed(token_stores, text_corpus, tokenizer,
                                                   tmp_path, monkeypatch, hf_cache):
    original, calls, stop = RowStoreWriter.write_shard, [], [True]

    def flaky(self, shard, data, info=None):
        calls.append(shard)
        if len(calls) == 3 and stop[0]:
            raise KeyboardInterrupt  # as if the run were stopped here
        return original(self, shard, data, info)

    monkeypatch.setattr(RowStoreWriter, "write_shard", flaky)
    kw = dict(seq_len=32, eval_fraction=0.1, seed=3, shard_rows=8, progress=False,
              cache_dir=hf_cache)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(str(text_corpus), tokenizer, tmp_path, **kw)
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        open_token_store(tmp_path, "train")
    calls.clear()
    stop[0] = False
    summary = build_token_store(str(text_corpus), tokenizer, tmp_path, **kw)
    num_shards = -(-summary["train"]["rows"] // 8) + -(-summary["eval"]["rows"] // 8)
    assert len(calls) == num_shards - 2  # only the missing shards were written
    for split in ("train", "eval"):
        assert summary[split]["fingerprint"] == token_stores[1][split]["fingerprint"]
    with pytest.raises(StoreMismatchError, match="differs in: .*seq_len"):
        build_token_store(str(text_corpus), tokenizer, tmp_path, **{**kw, "seq_len": 16})
    # data edited in place after a build: resuming onto that store is refused
    corpus = shutil.copy(text_corpus, tmp_path / "copy.jsonl")
    build_token_store(corpus, tokenizer, tmp_path / "again", **{**kw, "eval_fraction": 0})
    with open(corpus) as f:
        lines = [json.loads(line) for line in f]
    lines[0]["text"] = lines[0]["text"][::-1]
    write_jsonl(corpus, lines)
    with pytest.raises(StoreMismatchError, match="differs in: .*docs_sha256"):
        build_token_store(corpus, tokenizer, tmp_path / "again", **{**kw, "eval_fraction": 0})


def test_tokenizer_mismatch_is_refused(token_stores, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    store = open_token_store(token_stores[0], "train")
    store.check_tokenizer(tokenizer)
    other = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, vocab_size=300)))
    with pytest.raises(StoreMismatchError, match="packed with another tokenizer .* Re-pack"
                       ) as err:
        store.check_tokenizer(other)
    for fp, size in ((store.tokenizer_fingerprint, store.vocab_size),
                     (tokenizer_fingerprint(other), len(other))):
        assert f"{fp[:16]}…, vocabulary {size}" in str(err.value)


def test_chat_build_masks_prompts(tokenizer, tmp_path, hf_cache):
    conv = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "dog"}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}] * 3)
    build_token_store(str(tmp_path / "chat.jsonl"), tokenizer, tmp_path / "s", seq_len=64,
                      pack_mode="pad", progress=False, cache_dir=hf_cache)
    rows = open_token_store(tmp_path / "s", "train").read(np.array([0]))
    segs = rows["segment_ids"][0]
    assert segs.max() >= 2  # several conversations share the row
    for s in range(1, segs.max() + 1):
        trained = rows["targets"][0][rows["loss_mask"][0] & (segs == s)]
        assert tokenizer.decode(trained) == "dog</s>"


def test_pack_cli(text_corpus, tokenizer_dir, tmp_path, capsys, hf_cache):
    from kdjax.cli import main

    rc = main(["pack", str(text_corpus), "--tokenizer", str(tokenizer_dir), "--out",
               str(tmp_path), "--seq-len", "24", "--eval-docs", "5", "--max-docs", "40",
               "--cache-dir", hf_cache])
    printed = capsys.readouterr().out
    assert rc == 0 and "train:" in printed and "eval:" in printed and str(tmp_path) in printed
    assert open_token_store(tmp_path, "eval").manifest["num_docs"] == 5
    assert open_token_store(tmp_path, "train").manifest["num_docs"] == 35


@pytest.mark.slow
def test_parallel_tokenization_gives_the_same_store(token_stores, text_corpus, tokenizer_dir,
                                                    tmp_path):
    """`kdjax pack --num-proc 2` in a fresh process (forking is refused once JAX runs)."""
    cmd = [sys.executable, "-m", "kdjax.cli", "pack", str(text_corpus), "--tokenizer",
           str(tokenizer_dir), "--out", str(tmp_path / "s"), "--seq-len", "32",
           "--eval-fraction", "0.1", "--seed", "3", "--num-proc", "2",
           "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "eval"):
        store = open_token_store(tmp_path / "s", split)
        assert store.fingerprint == token_stores[1][split]["fingerprint"]
    assert "tokenizing (num_proc=2)" in done.stderr  # datasets' parallel progress bar


def test_streamed_text_file(tokenizer, tmp_path, hf_cache, rng):
    from .conftest import random_texts

    (tmp_path / "docs.txt").write_text("\n".join(random_texts(rng, 15)))
    prints = [build_token_store(str(tmp_path / "docs.txt"), tokenizer, tmp_path / f"s{s}",
                                seq_len=16, streaming=s, progress=False,
                                cache_dir=hf_cache)["train"]["fingerprint"] for s in (0, 1)]
    assert prints[0] == prints[1]


def test_no_fork_once_jax_runs(token_stores, text_corpus, tokenizer, tmp_path, caplog):
    import logging

    import jax

    jax.devices()  # a backend is up: forking would risk a deadlock (and warn)
    with caplog.at_level(logging.INFO, logger="kdjax.data.build"):
        summary = build_token_store(str(text_corpus), tokenizer, tmp_path, seq_len=32,
                                    eval_fraction=0.1, seed=3, num_proc=2, progress=False,
                                    cache_dir=str(tmp_path / "cache"))
    assert "tokenizing in-process" in caplog.text
    assert summary["train"]["fingerprint"] == token_stores[1]["train"]["fingerprint"]
