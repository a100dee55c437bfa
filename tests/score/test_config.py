"""`ScoreConfig`: bad values are refused with the key, the value and the fix."""

import pytest

from kdjax.schema import ConfigError
from kdjax.score.config import ScoreConfig

BASE = ["data=gen", "out=prefs", "model=teacher"]


@pytest.mark.parametrize("over,match", [
    (["method=rank"], r"^method: unknown value 'rank'.*'likelihood', 'judge', 'labels'"),
    (["pairs=best"], r"^pairs: unknown value 'best'; choose one of \['best_worst', 'all'\]"),
    (["min_margin=-1"], r"^min_margin: must be >= 0, got -1.0"),
    (["batch_size=0"], r"^batch_size: must be >= 1, got 0"),
    (["shard_prompts=0"], r"^shard_prompts: must be >= 1, got 0"),
    (["buckets=[32, 16]"], r"^buckets: must be a non-empty increasing list"),
    (["judge.grades=[5]"], r"^judge.grades: must be at least two distinct integers"),
    (["judge.grades=[1, 1, 2]"], r"^judge.grades: must be at least two distinct integers"),
    (["method=labels"], r"^model: method=labels runs no teacher"),
    (["model=null"], r"^model: method=likelihood needs the scoring teacher"),
    (["data=''"], r"^data: required"),
    (["format=trl"], r"^format: unknown value 'trl'"),
    (["dtype=fp8"], r"^dtype: unknown value 'fp8'"),
    (["mesh=[1, 1]"], r"^mesh: must be \[data, fsdp, tensor\]"),
    (["teacherr=x"], r"unknown config key 'teacherr'"),
])
def test_bad_settings_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        ScoreConfig.load(None, BASE + over)


def test_aliases_and_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'reference'"):
        ScoreConfig.load(None, BASE + ["ref=x"])
    config = ScoreConfig.load(None, ["data=gen", "out=prefs", f"model={tmp_path}",
                                     "judge.template=/no/such.yaml"])
    with pytest.raises(ConfigError, match=r"^judge.template: '/no/such.yaml' does not exist"):
        config.check_paths()
    config = ScoreConfig.load(None, ["data=gen", "out=prefs", "model=/no/teacher"])
    with pytest.raises(ConfigError, match=r"^model: the scoring teacher '/no/teacher' does "):
        config.check_paths()
