"""Tokenization: text documents end with EOS; chat/instruction examples train only on the
assistant turns (with and without a chat template)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdjax.data.tokenize import Fields, encode_batch, encode_chat, tokenizer_fingerprint

from .conftest import make_tokenizer

CONV = [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": "lazy dog"},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "seed mesh"}]


def trained_text(tokenizer, ids, train):
    return tokenizer.decode(ids[train])


def test_chat_template_masks_prompt(tokenizer):
    ids, train = encode_chat(tokenizer, CONV)
    full = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert tokenizer.decode(ids) == full
    assert trained_text(tokenizer, ids, train) == "lazy dog</s>seed mesh</s>"
    assert "user" not in trained_text(tokenizer, ids, train)


def test_no_template_falls_back_to_role_lines(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, chat_template=False)))
    ids, train = encode_chat(tok, CONV)
    assert tok.decode(ids) == "user: the fox\nassistant: lazy dog\nuser: more\n" \
                              "assistant: seed mesh\n</s>"
    # byte-level tokens carry their leading space, which belongs to the answer
    assert trained_text(tok, ids, train) == " lazy dog\n seed mesh\n</s>"


def test_text_and_pairs(tokenizer):
    out = encode_batch({"text": ["the fox", "dog"]}, tokenizer, Fields(text="text"))
    assert [tokenizer.decode(i) for i in out["ids"]] == ["the fox</s>", "dog</s>"]
    assert all(t.all() for t in out["train"]) and out["length"] == [len(i) for i in out["ids"]]
    pair = encode_batch({"q": ["the fox"], "a": ["lazy dog"]}, tokenizer,
                        Fields(prompt="q", response="a"))
    assert trained_text(tokenizer, pair["ids"][0], pair["train"][0]) == "lazy dog</s>"


def test_fields_inference_and_errors():
    assert Fields.infer(["id", "messages"]) == Fields(messages="messages")
    assert Fields.infer(["instruction", "output"]) == Fields(prompt="instruction",
                                                             response="output")
    with pytest.raises(ValueError, match=r"among \['body', 'id'\].*text_field"):
        Fields.infer(["id", "body"])
    with pytest.raises(ValueError, match="exactly one"):
        Fields(text="a", messages="b").kind()
    with pytest.raises(ValueError, match="exactly one"):
        Fields(prompt="a").kind()


def test_tokenizer_fingerprint_tracks_vocab_and_template(tokenizer, tokenizer_dir, tmp_path):
    again = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    other = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "a", vocab_size=300)))
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    again.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(again) != tokenizer_fingerprint(tokenizer)
    assert np.asarray(encode_chat(tokenizer, CONV)[0]).dtype == np.int32
