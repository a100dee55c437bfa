"""Every command explains itself to a user: `--help` texts, every setting with its default
and meaning, the README's command table and the example precompute configs."""

import argparse
import dataclasses
import pathlib
import re

import pytest

from kdjax.cli import build_parser, main
from kdjax.schema import format_value, settings
from kdjax.teacher.config import PrecomputeConfig
from kdjax.train.config import Config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def help_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


OURS = ("quickstart", "pack", "precompute", "inspect", "train", "eval", "export")


@pytest.mark.parametrize("name", OURS)
def test_every_option_has_help_written_for_users(commands, name):
    parser = commands[name]
    text = parser.format_help()
    for developer_talk in ("registered by", "add_parser", "kdjax/cli.py"):
        assert developer_talk not in text
    for action in parser._actions:
        assert action.help, f"kdjax {name} {action.option_strings or action.dest} has no help"


def test_eval_and_export_have_their_own_help(commands):
    descriptions = {n: commands[n].description for n in ("train", "eval", "export")}
    assert len(set(descriptions.values())) == 3


def test_precompute_help_lists_every_setting_with_default_and_meaning(capsys):
    text = " ".join(help_of(capsys, "precompute").split())
    for field in dataclasses.fields(PrecomputeConfig):
        default = format_value(field.default)
        assert f"{field.name} (default: {default}): " in text, field.name
    assert "--overwrite" in text


def test_train_help_lists_every_setting(capsys):
    text = " ".join(help_of(capsys, "train").split())
    for key, default, meaning in settings(Config):
        assert meaning, f"{key} has no docstring"
        assert f"{key} (default: {default}): " in text


def test_pack_example_keeps_its_line_continuation(capsys):
    text = help_of(capsys, "pack")
    assert "--out stores/tokens \\\n      --eval-fraction 0.01" in text


def test_debug_is_accepted_after_any_command(capsys):
    with pytest.raises(SystemExit):  # parsed (then --help exits), not refused
        main(["inspect", "STORE", "--debug", "--help"])
    assert "usage: kdjax inspect" in capsys.readouterr().out


def _commands_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Commands"):text.index("## Using the kernels")]


def test_readme_lists_every_command_and_its_options(commands):
    section = _commands_section()
    for name, parser in commands.items():
        assert f"`kdjax {name}" in section, name
        if name not in OURS:
            continue
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help", "--distributed", "--coordinator-address",
                                "--num-processes", "--process-id"):
                    assert flag in section, f"kdjax {name} {flag}"


def test_readme_lists_every_setting():
    section = _commands_section()
    for key, default, _ in settings(PrecomputeConfig):
        assert f"| `{key}` | {default} |" in section, key
    rows = {}  # section → the keys its README row lists
    for line in section[section.index("| section | keys |"):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, keys = line.strip("|").split(" | ")
        for sec in re.findall(r"`([^`]+)`", first) or [""]:
            rows[sec] = re.findall(r"`([^`]+)`", keys)
    for key, _, _ in settings(Config):
        sec, _, leaf = key.rpartition(".")
        assert leaf in rows.get(sec, ()), key


def test_example_precompute_configs_load():
    from kdjax.quickstart import SIZES, precompute_config

    paths = sorted((ROOT / "configs" / "precompute").glob("*.yaml"))
    assert {p.name for p in paths} >= {"quickstart_sampled.yaml"}
    for path in paths:
        text = path.read_text()
        assert text.startswith("#") and "kdjax precompute --config" in text.split("\n\n")[0]
        PrecomputeConfig.load(str(path))
    # the quickstart's example is what `kdjax quickstart` runs (but for overwrite/progress)
    out = pathlib.Path("runs/quickstart")
    expected = precompute_config(out, str(out / "teacher" / "hf"), str(out / "tokens" / "train"),
                                 SIZES["default"], 0, True, tokenizer=str(out / "tokenizer"))
    shipped = PrecomputeConfig.load(str(ROOT / "configs" / "precompute" /
                                        "quickstart_sampled.yaml"))
    assert dataclasses.replace(shipped, overwrite=True) == expected


def test_readme_mentions_the_settings_loader_suggestion():
    assert re.search(r"`topk=16` → did you mean `k`", _commands_section())
