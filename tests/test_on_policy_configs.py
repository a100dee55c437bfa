"""configs/on_policy/*.yaml load (and print through `kdjax train --print-config`), are the
runs of the quality experiment (benchmarks/on_policy_quality.py), and stop on the
quickstart tokenizer's " ." and eos; `Grammar.accepts` is an exact recogniser of the
quickstart's language (checked against an independent regular expression and against
the probabilities it sums)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from kdjax import quickstart as qs
from kdjax.train.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"gkd": "gkd λ=1", "rkl_reward": "rkl_reward", "minillm": "minillm"}
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def experiment():
    from kdjax import bench

    return bench.load("on_policy_quality")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_is_the_experiment_arm(name, experiment, capsys):
    from kdjax import cli

    path = ROOT / "configs" / "on_policy" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and "kdjax train --config" in text.split("\n\n")[0]
    shipped = load_config(path, QUIET)
    expected = config_from_dict(experiment.arm_config(
        CONFIGS[name], 0, Path("runs/on_policy"), qs.SIZES["default"], steps=400, vocab=384,
        stop_ids=list(shipped.objective.on_policy.stop_ids)))
    assert shipped.to_dict() == expected.to_dict()
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0
    assert "on_policy:" in capsys.readouterr().out


def test_stop_ids_are_the_quickstart_tokenizers_period_and_eos(tmp_path):
    """The shipped ids are those of the tokenizer `make_data` trains (same corpus, seed 0)."""
    from kdjax.models import train_bpe_tokenizer

    size = qs.SIZES["default"]
    grammar, rng = qs.Grammar(), np.random.default_rng(0)
    docs = [grammar.document(rng) for _ in range(size["teacher_docs"])]
    tok = train_bpe_tokenizer(docs, size["vocab"], tmp_path / "tok")
    expected = [*tok(" .", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(tok) == 384 and len(expected) == 2
    for name in CONFIGS:
        config = load_config(ROOT / "configs" / "on_policy" / f"{name}.yaml", QUIET)
        assert list(config.objective.on_policy.stop_ids) == expected, name


# ----------------------------------------------------------------------- Grammar.accepts

def _syntax() -> re.Pattern:
    """The language's support as a regular expression, written from the templates (every
    table entry of the seed-1234 grammar is > 0, checked below, so support = syntax)."""
    words = {slot: "(?:" + "|".join(map(re.escape, ws)) + ")" for slot, ws in qs._WORDS.items()}
    sentences = []
    for template in qs._TEMPLATES:
        parts = [words[p[1:-1].split(":")[0]] if p.startswith("{") else re.escape(p)
                 for p in template.split(" ")]
        sentences.append(" ".join(parts))
    one = "(?:" + "|".join(sentences) + ")"
    return re.compile(f"{one}(?: {one}){{0,4}}")


@pytest.fixture(scope="module")
def grammar():
    g = qs.Grammar()
    assert min(t.min() for t in g.tables.values()) > 0 and g.template_probs.min() > 0
    return g


def test_accepts_everything_the_grammar_generates(grammar):
    rng = np.random.default_rng(7)
    for _ in range(300):
        doc = grammar.document(rng)
        assert grammar.accepts(doc), doc
        sentence = grammar.sentence(int(rng.integers(4)), rng)
        assert grammar.accepts(sentence), sentence


def _mutations(text: str, rng) -> list[str]:
    words = text.split(" ")
    vocab = [w for ws in qs._WORDS.values() for w in ws] + ["the", "a", "and", "."]
    i = int(rng.integers(len(words)))
    same = [ws for ws in qs._WORDS.values() if words[i] in ws]  # a word of the same slot
    swapped = words[:i] + [str(rng.choice(same[0])) if same else words[i]] + words[i + 1:]
    ends = [j for j, w in enumerate(words[:-1]) if w == "."]
    return [" ".join(swapped), " ".join(words[:ends[-1] + 1]) if ends else text,
            " ".join(words[:i] + words[i + 1:]),                       # drop a word
            " ".join(words[:i] + [str(rng.choice(vocab))] + words[i:]),  # insert one
            " ".join(words[:i] + [str(rng.choice(vocab))] + words[i + 1:]),  # replace
            " ".join(words[:-1]),                                      # no final "."
            text + " ", " " + text, text.replace(" ", "  ", 1),        # whitespace
            " ".join(words[::-1])]


def test_accepts_equals_the_syntax_on_corrupted_strings(grammar):
    syntax, rng = _syntax(), np.random.default_rng(3)
    seen = {True: 0, False: 0}
    for _ in range(200):
        for text in _mutations(grammar.document(rng), rng):
            want = syntax.fullmatch(text) is not None
            assert grammar.accepts(text) == want, text
            seen[want] += 1
    assert seen[False] > 500 and seen[True] > 20  # both outcomes are exercised
    six = " ".join(grammar.sentence(0, rng) for _ in range(6))
    assert syntax.fullmatch(six) is None and not grammar.accepts(six)
    assert not grammar.accepts("") and not grammar.accepts(".")


def test_sentence_probabilities_sum_to_the_template_probability(grammar):
    """Σ over every sentence of template 3 ("in the {place} …", no other template starts
    with "in") of P(sentence | topic) = P(template 3 | topic), to float64 rounding."""
    w = qs._WORDS
    total = sum(grammar.sentence_probability(
        f"in the {p} the {a} {v} {t} .".split(" "), 1)
        for p, a, v, t in itertools.product(w["place"], w["animal"], w["verb"], w["time"]))
    np.testing.assert_allclose(total, grammar.template_probs[1][2], rtol=1e-12)


def test_a_zero_table_entry_rules_out_its_word_and_mixed_topic_documents():
    g = qs.Grammar()
    # topic 0 never says "ada" first in template 2, topic 1 never says "bob": a document
    # needing both cannot be generated, though each sentence alone can
    for topic, name in ((0, 0), (1, 1)):
        table = g.tables[(topic, "name", None)].copy()
        table[:, name] = 0.0
        g.tables[(topic, "name", None)] = table / table.sum(1, keepdims=True)
    for t in (2, 3):
        g.template_probs[t] = np.eye(len(qs._TEMPLATES))[0]  # topics 2, 3: template 1 only
    ada, bob = "ada sees a hat in the park .", "bob sees a hat in the park ."
    assert g.accepts(ada) and g.accepts(bob)
    assert g.sentence_probability(ada.split(" "), 0) == 0.0 < g.sentence_probability(
        ada.split(" "), 1)
    assert not g.accepts(f"{ada} {bob}")
    assert g.accepts(f"{ada} {ada}") and g.accepts(f"{bob} {bob}")
