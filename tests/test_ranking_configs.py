"""configs/ranking/*.yaml load (and print through `kdjax train --print-config`), are the
first DPO and PRO arms of the ranking experiment (benchmarks/ranking_quality.py, seed 0),
and their headers give the feedback commands with the experiment's settings."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from kdjax.train.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("dpo", "pro")
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def experiment():
    from kdjax import bench

    return bench.load("ranking_quality")


def _path(name: str) -> Path:
    return ROOT / "configs" / "ranking" / f"{name}.yaml"


@pytest.mark.parametrize("name", NAMES)
def test_config_is_the_experiment_run(name, experiment, capsys):
    from kdjax import cli

    shipped = load_config(_path(name), QUIET)
    arm = next(a for a in map(experiment.Arm.parse, experiment.ARMS) if a.method == name)
    expected = config_from_dict(experiment.ranking_config(
        arm, 0, Path("runs/ranking"), Path("runs/ranking/inputs")))
    assert shipped.to_dict() == expected.to_dict()
    assert shipped.objective.ranking.method == name
    assert cli.main(["train", "--config", str(_path(name)), "--print-config"]) == 0
    assert f"method: {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_header_gives_the_experiments_commands(name, experiment):
    """generate → score (reference = the starting student) → pack → train, exactly as the
    experiment runs them for seed 0, with the tokenizer's " ." as the stop id (the on-policy
    configs' first stop id, which tests/test_on_policy_configs.py checks against the
    trained tokenizer)."""
    header = _path(name).read_text().split("\n\n")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    text = " ".join(line.lstrip("# ").rstrip("\\ ") for line in header.splitlines())
    dot = load_config(ROOT / "configs" / "on_policy" / "gkd.yaml",
                      QUIET).objective.on_policy.stop_ids[0]
    commands = experiment.feedback_commands(0, Path("runs/ranking"), Path("runs/ranking/inputs"),
                                            dot)
    lines = [shlex.join(["kdjax", *argv]) for argv in commands.values()]
    lines.append(f"kdjax train --config configs/ranking/{name}.yaml")
    for line in lines:
        assert f"{line} " in text, line
    assert [text.index(line) for line in lines] == sorted(text.index(line) for line in lines)
    start = experiment.paths(Path("runs/ranking"), 0)["start_hf"]
    assert f"reference={start} " in text and f"--model {start} " in text


def test_bad_override_names_the_setting():
    with pytest.raises(ConfigError, match="objective.ranking.beta"):
        load_config(_path("dpo"), [*QUIET, "objective.ranking.beta=-1"])
    with pytest.raises(ConfigError, match="objective.ranking.method"):
        load_config(_path("pro"), [*QUIET, "objective.ranking.method=ppo"])


def test_arm_specs(experiment):
    arm = experiment.Arm.parse("pro:150:5e-4:1.0")
    assert (arm.method, arm.steps, arm.lr, arm.sft_weight) == ("pro", 150, 5e-4, 1.0)
    config = experiment.ranking_config(arm, 1, Path("o"), Path("i"))
    assert config["run_dir"] == str(Path("o") / "s1" / arm.name)
    assert config["objective"]["ranking"] == {"method": "pro", "sft_weight": 1.0}
    assert experiment.Arm.parse("dpo:36:1e-4").name != experiment.Arm.parse("dpo:36:5e-4").name
    for bad in ("ppo:36:1e-4", "dpo:36", "dpo:36:1e-4:1:2"):
        with pytest.raises(argparse.ArgumentTypeError, match="METHOD:STEPS:LR"):
            experiment.Arm.parse(bad)
