"""Shared fixtures: a tiny BPE tokenizer with a chat template, and small jsonl corpora."""

import json

import numpy as np
import pytest

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "data", "store",
         "shard", "chunk", "token", "row", "teacher", "student", "loss", "batch", "step",
         "seed", "mesh", "device", "host", "epoch"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tokenizer(out_dir, *, vocab_size=400, chat_template=True):
    """A byte-level BPE tokenizer trained locally, saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def random_texts(rng, n, max_words=30):
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, max_words))) for _ in range(n)]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A jsonl file of 120 short random documents."""
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return write_jsonl(path, [{"text": t, "id": i}
                              for i, t in enumerate(random_texts(rng, 120))])


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    """A private `datasets` cache, so tests leave nothing in ~/.cache."""
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="session")
def token_stores(text_corpus, tokenizer, tmp_path_factory, hf_cache):
    """train/eval token stores packed from `text_corpus` (L = 32)."""
    from kdjax.data import build_token_store

    out = tmp_path_factory.mktemp("stores")
    summary = build_token_store(str(text_corpus), tokenizer, out, seq_len=32,
                                eval_fraction=0.1, seed=3, shard_rows=8, progress=False,
                                cache_dir=hf_cache)
    return out, summary


@pytest.fixture(scope="module")
def store(token_stores):
    from kdjax.data import open_token_store

    return open_token_store(token_stores[0], "train")


@pytest.fixture(scope="module")
def mesh():
    from kdjax.sharding import make_mesh

    return make_mesh()  # data=8 over the 8 fake CPU devices


@pytest.fixture(scope="module")
def teacher(store, tmp_path_factory):
    """A sampled-teacher-like row store aligned with the token store's rows."""
    from kdjax.storage import RowStoreWriter, open_row_store

    path = tmp_path_factory.mktemp("teacher")
    arrays = {"ids": ((store.seq_len, 4), np.uint16), "counts": ((store.seq_len, 4), np.uint8)}
    with RowStoreWriter(path, arrays=arrays, num_rows=store.num_rows, shard_rows=16) as w:
        for s in w.missing_shards():
            lo, hi = w.shard_range(s)
            r = np.random.default_rng(s)
            w.write_shard(s, {"ids": r.integers(0, 400, (hi - lo, store.seq_len, 4)),
                              "counts": r.integers(0, 9, (hi - lo, store.seq_len, 4))})
        w.finalize()
    return open_row_store(path)
