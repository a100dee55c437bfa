"""The judge's template, grade tokens and expected grade, without a model."""

import pathlib

import numpy as np
import pytest
import yaml

from kdjax.schema import ConfigError
from kdjax.score.judge import (
    DEFAULT_TEMPLATE,
    build_requests,
    expected_grade,
    grade_tokens,
    load_template,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_shipped_template_file_is_the_default():
    shipped = ROOT / "configs" / "score" / "judge_template.yaml"
    assert yaml.safe_load(shipped.read_text()) == yaml.safe_load(DEFAULT_TEMPLATE)
    assert load_template(str(shipped)) == load_template(None)


@pytest.mark.parametrize("text,match", [
    ("user: 'Grade {answer}'\n", r"must use \{prompt\} and \{answer\}"),
    ("user: '{prompt} {answer} {score}'\n", r"it uses \['answer', 'prompt', 'score'\]"),
    ("user: '{prompt} {answer'\n", "bad placeholder"),
    ("user: '{prompt} {answer}'\nsystem: x\n", r"unknown keys \['system'\]"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_templates_are_refused(tmp_path, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_template(str(path))


def test_expected_grade_is_the_restricted_expectation(rng):
    lp = np.log(rng.dirichlet(np.ones(12), size=5))[:, :4]  # 4 grades of a 12-token vocab
    grades = [2, 4, 6, 9]
    score, mass = expected_grade(lp.astype(np.float32), grades)
    p = np.exp(lp)
    np.testing.assert_allclose(score, p @ grades / p.sum(1), rtol=1e-6)
    np.testing.assert_allclose(mass, p.sum(1), rtol=1e-6)
    tiny = expected_grade(np.full((1, 4), -1e4, np.float32), grades)  # every P(g) underflows
    assert tiny[0][0] == pytest.approx(np.mean(grades)) and tiny[1][0] == 0.0


def _bpe(tmp_path, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>",
                                                                  "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_a_space_folded_into_the_grade_moves_out_of_the_prefix(tmp_path):
    # GPT-2 style: " 7" is one token, so "Grade: " + "7" re-tokenizes the space
    tok = _bpe(tmp_path, " ".join(f"Grade: {g} 1{g}" for g in range(1, 10)))
    text = "Rate it. Grade: "
    found = grade_tokens(tok, text, [1, 2, 3], chat=False)
    assert found.strip_space and found.condition(text) == "Rate it. Grade:"
    assert tok.convert_ids_to_tokens(list(found.token_ids)) == ["Ġ1", "Ġ2", "Ġ3"]
    with pytest.raises(ConfigError, match=r"10 → .*use single-digit grades"):
        grade_tokens(tok, text, [1, 10], chat=False)


def test_requests_end_just_before_the_grade(tmp_path):
    tok = _bpe(tmp_path, "the quick fox Grade: 7")
    template = load_template(None)
    found, ids = build_requests(tok, template, [("q one", "a"), ("q two", "b b")],
                                [1, 2, 3], chat=None)  # no chat template: plain text
    for i, (q, a) in enumerate([("q one", "a"), ("q two", "b b")]):
        text = template.user.format(prompt=q, answer=a, min_grade=1, max_grade=3)
        text += template.response_prefix
        assert ids[i] == tok(found.condition(text), add_special_tokens=True)["input_ids"]
        graded = tok(text + "2", add_special_tokens=True)["input_ids"]
        assert graded == [*ids[i], found.token_ids[1]]
    with pytest.raises(ConfigError, match="has no chat template"):
        build_requests(tok, template, [("q", "a")], [1, 2], chat=True)
