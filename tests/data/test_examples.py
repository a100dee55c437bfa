"""Example stores (`kdjax pack --layout examples`) and packing a generated dataset (SeqKD):
chat rendering, truncation and drop policies, stable example ids, read-back, layout
mismatches, resume after interruption, the completion-only loss mask of generated data."""

import json

import numpy as np
import pytest

from kdjax.data import (
    build_example_store,
    build_token_store,
    open_example_store,
    open_token_store,
    tokenizer_fingerprint,
)
from kdjax.data.examples import encode_example
from kdjax.data.tokenize import encode_chat
from kdjax.storage import RowStoreWriter, StoreIncompleteError, StoreMismatchError

from .conftest import WORDS, make_tokenizer, random_texts, write_jsonl


def template_ids(tokenizer, messages):
    """`apply_chat_template(..., add_generation_prompt=True)` token ids, whatever the
    transformers version returns (a list or a BatchEncoding)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def random_conv(rng, turns):
    roles = ["user", "assistant"] * turns
    return [{"role": r, "content": " ".join(rng.choice(WORDS, size=rng.integers(1, 12)))}
            for r in roles[:rng.integers(1, 2 * turns + 1)]]


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    """40 random conversations; some end with an assistant turn (a completion), some not."""
    rng = np.random.default_rng(7)
    convs = [random_conv(rng, 3) for _ in range(40)]
    assert {c[-1]["role"] for c in convs} == {"user", "assistant"}
    path = write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl",
                       [{"messages": c, "id": i} for i, c in enumerate(convs)])
    return path, convs


def reference(tokenizer, convs, prompt_len, completion_len, truncate):
    """Independent expected rows: {example_id: (prompt row, prompt_len, completion row,
    completion_len)} for the kept examples."""
    out = {}
    for i, conv in enumerate(convs):
        ends = conv[-1]["role"] == "assistant"
        prompt = conv[:-1] if ends else conv
        p = template_ids(tokenizer, prompt) if prompt else []
        if not p or (truncate == "drop" and len(p) > prompt_len):
            continue
        p = p[-prompt_len:]
        c = []
        if ends:  # what the template adds for the final assistant turn
            text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                 add_generation_prompt=True)
            full = tokenizer.apply_chat_template(conv, tokenize=False)
            c = tokenizer(full[len(text):], add_special_tokens=False)["input_ids"]
        c = c[:completion_len]
        prow = np.zeros(prompt_len, np.int32)  # pad id of the test tokenizer: <pad> = 0
        crow = np.zeros(completion_len, np.int32)
        prow[:len(p)], crow[:len(c)] = p, c
        out[i] = (prow, len(p), crow, len(c))
    return out


def test_chat_rendering_equals_the_template(tokenizer):
    conv = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "lazy dog"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "seed mesh"}]
    prompt, completion = encode_example(tokenizer, conv)
    assert list(prompt) == template_ids(tokenizer, conv[:-1])
    assert tokenizer.decode(completion) == "seed mesh</s>"
    # the same tokens the packed layout trains on for that turn
    ids, train = encode_chat(tokenizer, conv)
    np.testing.assert_array_equal(ids[len(ids) - len(completion):], completion)
    assert train[len(ids) - len(completion):].all()
    # no final assistant turn: the whole conversation is the prompt
    prompt, completion = encode_example(tokenizer, conv[:-1])
    assert list(prompt) == template_ids(tokenizer, conv[:-1]) and completion is None
    assert prompt.dtype == np.int32


def test_no_template_layout(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, chat_template=False)))
    conv = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "lazy dog"}]
    prompt, completion = encode_example(tok, conv)
    assert tok.decode(prompt) == "user: the fox\nassistant:"
    assert tok.decode(completion) == " lazy dog\n</s>"  # what encode_chat trains on


@pytest.mark.parametrize("truncate", ["left", "drop"])
def test_store_equals_reference(chat_corpus, tokenizer, tmp_path, hf_cache, truncate):
    path, convs = chat_corpus
    P, C = 24, 6
    ref = reference(tokenizer, convs, P, C, truncate)
    out = build_example_store(str(path), tokenizer, tmp_path, prompt_len=P, completion_len=C,
                              truncate=truncate, eval_docs=5, seed=1, shard_rows=4,
                              progress=False, cache_dir=hf_cache)
    perm = np.random.default_rng(1).permutation(len(convs))  # documented: seeded split
    got_ids = []
    for split, members in (("train", perm[5:]), ("eval", perm[:5])):
        store = open_example_store(tmp_path, split)
        rows = store.read(np.arange(store.num_rows))
        assert {k: v.dtype for k, v in rows.items()} == {
            "prompt": np.int32, "prompt_len": np.int32, "completion": np.int32,
            "completion_len": np.int32, "example_id": np.int64}
        want = sorted(set(members.tolist()) & set(ref))
        assert rows["example_id"].tolist() == want  # source order, stable ids
        for r, eid in enumerate(want):
            prow, plen, crow, clen = ref[eid]
            np.testing.assert_array_equal(rows["prompt"][r], prow)
            np.testing.assert_array_equal(rows["completion"][r], crow)
            assert (rows["prompt_len"][r], rows["completion_len"][r]) == (plen, clen)
        got_ids += want
        assert store.prompt_len == P and store.completion_len == C
        assert store.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
        assert store.manifest["row_layout"] == "examples" and store.check() == []
        store.check_tokenizer(tokenizer)
        counts = store.manifest["counts"]
        assert counts == {k: out[split][k] for k in counts}
        assert counts["num_examples"] == len(members)
    assert sorted(got_ids) == sorted(ref)
    lens = {i: len(template_ids(tokenizer, c[:-1] if c[-1]["role"] == "assistant" else c))
            for i, c in enumerate(convs)}
    long = sum(n > P for n in lens.values())
    assert long > 0
    total = {k: out["train"][k] + out["eval"][k] for k in out["train"]
             if k not in ("path", "fingerprint")}
    if truncate == "left":
        assert (total["truncated_prompts"], total["dropped_long_prompts"]) == (long, 0)
        assert total["rows"] == len(convs)
    else:
        assert (total["truncated_prompts"], total["dropped_long_prompts"]) == (0, long)
        assert total["rows"] == len(convs) - long
    assert total["truncated_completions"] == sum(
        1 for e, (_, _, _, n) in ref.items() if n == C and
        len(encode_example(tokenizer, convs[e])[1]) > C)


def test_prompt_completion_fields_and_text(tokenizer, tmp_path, hf_cache):
    rng = np.random.default_rng(11)
    texts = random_texts(rng, 12, max_words=8)
    records = [{"prompt": t, "completion": t[::-1]} for t in texts]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    build_example_store(str(tmp_path / "pairs.jsonl"), tokenizer, tmp_path / "pairs",
                        prompt_len=40, progress=False, cache_dir=hf_cache)
    store = open_example_store(tmp_path / "pairs", "train")
    rows = store.read(np.arange(store.num_rows))
    assert rows["example_id"].tolist() == list(range(12))
    for r, rec in enumerate(records):
        want = template_ids(tokenizer, [{"role": "user", "content": rec["prompt"]}])
        assert rows["prompt"][r, :rows["prompt_len"][r]].tolist() == want
        comp = rows["completion"][r, :rows["completion_len"][r]]
        assert tokenizer.decode(comp) == rec["completion"] + "</s>"
    # C defaults to the longest completion: nothing truncated
    assert store.completion_len == rows["completion_len"].max()
    assert store.manifest["counts"]["truncated_completions"] == 0
    # plain text: prompts only (no completion arrays); an empty prompt is a counted drop
    write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in ["", *texts[:3]]])
    out = build_example_store(str(tmp_path / "text.jsonl"), tokenizer, tmp_path / "text",
                              prompt_len=4, progress=False, cache_dir=hf_cache)
    store = open_example_store(tmp_path / "text", "train")
    assert store.completion_len is None and out["completion_len"] is None
    rows = store.read(np.arange(store.num_rows))
    assert set(rows) == {"prompt", "prompt_len", "example_id"}
    assert rows["example_id"].tolist() == [1, 2, 3] and out["train"]["dropped_empty_prompts"] == 1
    for r, t in enumerate(texts[:3]):
        ids = tokenizer(t)["input_ids"][-4:]
        assert rows["prompt"][r, :rows["prompt_len"][r]].tolist() == ids
    with pytest.raises(ValueError, match="no example has a completion"):
        build_example_store(str(tmp_path / "text.jsonl"), tokenizer, tmp_path / "t2",
                            prompt_len=4, completion_len=3, progress=False, cache_dir=hf_cache)


def test_read_back_random_rows(tmp_path):
    """What the writer stores comes back bit for bit (random values, record layout)."""
    from kdjax.data.examples import ExampleStore, example_arrays

    rng = np.random.default_rng(5)
    n, P, C = 37, 9, 5
    data = {"prompt": rng.integers(0, 2**31 - 1, (n, P)), "prompt_len": rng.integers(1, P, n),
            "completion": rng.integers(0, 2**31 - 1, (n, C)),
            "completion_len": rng.integers(0, C, n), "example_id": rng.integers(0, 2**40, n)}
    meta = {"kind": "kdjax.example_store", "row_layout": "examples", "prompt_len": P,
            "completion_len": C, "vocab_size": 2**31, "pad_id": 0, "data_fingerprint": "x",
            "tokenizer_fingerprint": "y"}
    with RowStoreWriter(tmp_path, arrays=example_arrays(P, C), num_rows=n, shard_rows=8,
                        metadata=meta, layout="record") as w:
        for s in w.missing_shards():
            lo, hi = w.shard_range(s)
            w.write_shard(s, {k: v[lo:hi] for k, v in data.items()})
        w.finalize()
    store = ExampleStore(tmp_path)
    rows = rng.permutation(n)[:20]
    got = store.read(rows)
    for k, v in data.items():
        np.testing.assert_array_equal(got[k], v[rows])


def test_layout_mismatch_is_named(token_stores, chat_corpus, tokenizer, tmp_path, hf_cache):
    with pytest.raises(StoreMismatchError, match="is a token store .*layout packed"):
        open_example_store(token_stores[0], "train")
    build_example_store(str(chat_corpus[0]), tokenizer, tmp_path, prompt_len=16,
                        completion_len=4, progress=False, cache_dir=hf_cache)
    with pytest.raises(StoreMismatchError, match="is an example store .*layout examples"):
        open_token_store(tmp_path, "train")
    with pytest.raises(StoreIncompleteError, match="'train'"):
        open_example_store(tmp_path)


def test_interrupted_build_is_refused_then_resumed(chat_corpus, tokenizer, tmp_path,
                                                   monkeypatch, hf_cache):
    """The example store is written by the same RowStoreWriter as the token store (atomic
    shard files, ledger, atomic manifest: kill -9 is covered in tests/storage); here the
    builder resumes only the missing shards and ends up equal to an uninterrupted build."""
    kw = dict(prompt_len=20, completion_len=5, shard_rows=4, progress=False,
              cache_dir=hf_cache)
    whole = build_example_store(str(chat_corpus[0]), tokenizer, tmp_path / "whole", **kw)
    original, calls, stop = RowStoreWriter.write_shard, [], [True]

    def flaky(self, shard, data, info=None):
        calls.append(shard)
        if len(calls) == 3 and stop[0]:
            raise KeyboardInterrupt
        return original(self, shard, data, info)

    monkeypatch.setattr(RowStoreWriter, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_example_store(str(chat_corpus[0]), tokenizer, tmp_path / "s", **kw)
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        open_example_store(tmp_path / "s", "train")
    calls.clear()
    stop[0] = False
    again = build_example_store(str(chat_corpus[0]), tokenizer, tmp_path / "s", **kw)
    assert len(calls) == -(-whole["train"]["rows"] // 4) - 2
    assert again["train"]["fingerprint"] == whole["train"]["fingerprint"]
    with pytest.raises(StoreMismatchError, match="differs in: .*prompt_len"):
        build_example_store(str(chat_corpus[0]), tokenizer, tmp_path / "s",
                            **{**kw, "prompt_len": 12})


# ---- generated datasets (SeqKD) -> packed rows ----

def write_generated(path, tokenizer, samples, fingerprint=None):
    """A generated dataset as `kdjax generate` will write it: parquet shards + manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    cols = {"prompt": [], "completion": [], "prompt_ids": [], "completion_ids": [],
            "finish_reason": [], "logprobs": [], "mean_logprob": [], "example_id": [],
            "sample_index": []}
    for eid, k, p, c in samples:
        cols["prompt"].append(tokenizer.decode(p))
        cols["completion"].append(tokenizer.decode(c))
        cols["prompt_ids"].append([int(x) for x in p])
        cols["completion_ids"].append([int(x) for x in c])
        cols["finish_reason"].append("eos" if c and c[-1] == tokenizer.eos_token_id else "length")
        lp = [-0.5] * len(c)
        cols["logprobs"].append(lp)
        cols["mean_logprob"].append(float(np.mean(lp)) if lp else 0.0)
        cols["example_id"].append(eid)
        cols["sample_index"].append(k)
    table = pa.table(cols)
    half = len(samples) // 2  # two shards, read in sorted path order
    pq.write_table(table.slice(0, half), path / "part-00000.parquet")
    pq.write_table(table.slice(half), path / "part-00001.parquet")
    (path / "manifest.json").write_text(json.dumps({
        "kind": "generated", "num_samples": len(samples),
        "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(tokenizer)}))
    return path


@pytest.fixture(scope="module")
def generated(tokenizer, tmp_path_factory):
    rng = np.random.default_rng(3)
    samples = []
    eos = tokenizer.eos_token_id
    for eid in range(12):
        p = rng.integers(4, len(tokenizer), rng.integers(1, 7)).tolist()
        for k in range(2):
            c = rng.integers(4, len(tokenizer), rng.integers(1, 6)).tolist()
            samples.append((eid, k, p, c + [eos] if k == 0 else c))
    samples.append((12, 0, [5, 6, 7], []))  # nothing generated: no target, skipped
    return write_generated(tmp_path_factory.mktemp("gen"), tokenizer, samples), samples


def test_generated_dataset_trains_on_completions_only(generated, tokenizer, tmp_path,
                                                      hf_cache):
    path, samples = generated
    out = build_token_store(str(path), tokenizer, tmp_path, seq_len=16, pack_mode="pad",
                            progress=False, cache_dir=hf_cache)
    store = open_token_store(tmp_path, "train")
    rows = store.read(np.arange(store.num_rows))
    # pad mode, every sample fits a row: one segment per sample with a completion, in order
    kept = [(p, c) for _, _, p, c in samples if c]
    segs = [(r, s) for r in range(store.num_rows)
            for s in range(1, rows["segment_ids"][r].max() + 1)]
    assert len(segs) == len(kept)
    for (r, s), (p, c) in zip(segs, kept):
        cols = np.flatnonzero(rows["segment_ids"][r] == s)
        assert rows["tokens"][r, cols].tolist() == p + c  # no re-tokenisation
        mask = rows["loss_mask"][r, cols]
        # position t predicts token t+1: the last prompt token predicts the first
        # completion token (counts), every earlier prompt position does not
        want = np.zeros(len(cols), bool)
        want[len(p) - 1:len(p) + len(c) - 1] = True
        np.testing.assert_array_equal(mask, want)
        assert rows["targets"][r, cols][mask].tolist() == c
    assert store.manifest["loss_tokens"] == sum(len(c) for _, c in kept)
    assert out["train"]["rows"] == store.num_rows
    assert store.manifest["source"]["fields"]["generated"]
    # split mode (long samples cross rows): every completion token is a target once
    build_token_store(str(path), tokenizer, tmp_path / "split", seq_len=8, progress=False,
                      cache_dir=hf_cache)
    split = open_token_store(tmp_path / "split", "train")
    rows = split.read(np.arange(split.num_rows))
    assert split.manifest["loss_tokens"] == sum(len(c) for _, c in kept)
    assert sorted(rows["targets"][rows["loss_mask"]].tolist()) == sorted(
        t for _, c in kept for t in c)


def test_generated_dataset_with_another_tokenizer_is_refused(generated, tokenizer, tmp_path,
                                                             hf_cache):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "o", vocab_size=300)))
    with pytest.raises(StoreMismatchError, match="generated with another tokenizer"):
        build_token_store(str(generated[0]), other, tmp_path / "s", seq_len=16,
                          progress=False, cache_dir=hf_cache)
    with pytest.raises(ValueError, match="generated dataset.*drop the field options"):
        build_token_store(str(generated[0]), tokenizer, tmp_path / "s", seq_len=16,
                          text_field="prompt", progress=False, cache_dir=hf_cache)
    with pytest.raises(ValueError, match="--layout packed"):
        build_example_store(str(generated[0]), tokenizer, tmp_path / "e", prompt_len=8,
                            progress=False, cache_dir=hf_cache)


def test_pack_cli_examples_and_generated(chat_corpus, generated, tokenizer_dir, tmp_path,
                                         capsys, hf_cache):
    from kdjax.cli import main

    rc = main(["pack", str(chat_corpus[0]), "--tokenizer", str(tokenizer_dir), "--out",
               str(tmp_path / "ex"), "--layout", "examples", "--prompt-len", "48",
               "--completion-len", "6", "--truncate", "drop", "--eval-docs", "10",
               "--cache-dir", hf_cache])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "dropped (too long)" in printed.out and "eval:" in printed.out
    store = open_example_store(tmp_path / "ex", "eval")
    assert store.manifest["counts"]["num_examples"] == 10 and store.manifest["truncate"] == "drop"
    rc = main(["pack", str(chat_corpus[0]), "--tokenizer", str(tokenizer_dir), "--out",
               str(tmp_path / "bad"), "--layout", "examples", "--prompt-len", "8",
               "--seq-len", "32", "--cache-dir", hf_cache])
    assert rc == 2 and "--seq-len does not apply" in capsys.readouterr().err
    rc = main(["pack", str(generated[0]), "--tokenizer", str(tokenizer_dir), "--out",
               str(tmp_path / "gen"), "--seq-len", "16", "--cache-dir", hf_cache])
    assert rc == 0 and "train:" in capsys.readouterr().out
    assert open_token_store(tmp_path / "gen", "train").manifest["loss_tokens"] == sum(
        len(c) for *_, c in generated[1])
