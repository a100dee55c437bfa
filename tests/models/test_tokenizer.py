"""The byte-level BPE helper: AutoTokenizer loads what it saves, any text round-trips."""

import pytest
from transformers import AutoTokenizer

from kdjax.models import load_tokenizer, train_bpe_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "distillation moves knowledge",
         "a student learns from a teacher"] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(TEXTS, 300, out)
    return out


def test_auto_tokenizer_loads_and_round_trips(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 300
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ["the quick brown fox", "unseen wörds ✓ 123\n\ttabs"]:
        ids = tok(text)["input_ids"]
        assert max(ids) < 300
        assert tok.decode(ids) == text
    # merges were learned: a frequent word is fewer tokens than its bytes
    assert len(tok("teacher")["input_ids"]) < len("teacher")
    assert load_tokenizer(tokenizer_dir)("fox")["input_ids"] == tok("fox")["input_ids"]


def test_chat_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>hi<|eos|><|assistant|>hello<|eos|><|assistant|>"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(TEXTS, 100, tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)
