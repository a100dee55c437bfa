"""Instruction expansion pieces that need no model: seeds, parsing, prompts."""

import json

import pytest

from kdjax.generate.expand import expansion_prompt, parse_instruction, read_seeds


def test_read_seeds_txt_and_jsonl(tmp_path):
    (tmp_path / "s.txt").write_text("First task.\n\n  Second task.  \n")
    assert read_seeds(tmp_path / "s.txt") == ["First task.", "Second task."]
    (tmp_path / "s.jsonl").write_text(json.dumps({"instruction": "A"}) + "\n"
                                      + json.dumps({"prompt": "B"}) + "\n")
    assert read_seeds(tmp_path / "s.jsonl") == ["A", "B"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a seed needs an `instruction`"):
        read_seeds(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no instruction"):
        read_seeds(tmp_path / "empty.txt")


def test_the_shipped_seed_file_has_a_few_dozen_distinct_instructions():
    seeds = read_seeds("configs/generate/seed_instructions.txt")
    assert 30 <= len(seeds) <= 60 and len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("text,want", [
    ("7. Write a poem about rain.\n8. Another", "Write a poem about rain."),
    ("\n\n  - \"Describe a cloud.\"  ", "Describe a cloud."),
    ("   \n", None),
    ("3) List two fruits", "List two fruits"),
])
def test_parse_instruction(text, want):
    assert parse_instruction(text) == want


class _Tok:
    chat_template = None


def test_expansion_prompt_lists_the_examples_and_asks_for_the_next():
    text = expansion_prompt(["Do A.", "Do B."], _Tok())
    assert "1. Do A.\n2. Do B." in text and text.endswith("\n3.")
