"""PrecomputeConfig validation and the precompute CLI's argument handling."""

import pytest
import yaml

from kdjax.cli import main
from kdjax.schema import ConfigError
from kdjax.teacher import PrecomputeConfig


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"teacher": "t", "tokens": "d", "out": "o", "mode": "sampled",
                                 "hidden_layers": [1, -1]}))
    cfg = PrecomputeConfig.load(str(f), ["num_samples=128", "temperature=2"])
    assert (cfg.mode, cfg.num_samples, cfg.temperature) == ("sampled", 128, 2.0)
    assert cfg.hidden_layers == (1, -1)
    assert PrecomputeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("values,message", [
    ({"num_sample": 3}, r"unknown config key 'num_sample' \(did you mean 'num_samples'\?\)"),
    ({"topk": 16}, r"unknown config key 'topk' \(did you mean 'k'\?\)"),
    ({"top_k": 16}, r"did you mean 'k'\?"),
    ({"samples": 16}, r"did you mean 'num_samples'\?"),
    ({"mode": "top-k"}, r"mode: unknown value 'top-k' \(did you mean 'topk'\?\)"),
    ({"mode": "sparse"}, r"mode: unknown value 'sparse'.*choose one of"),
    ({"k": 0}, "k: must be >= 1, got 0"),
    ({"k": "many"}, "k: expected int, got str 'many'"),
    ({"temperature": -1.0}, "temperature: must be > 0, got -1.0"),
    ({"shard_rows": 10, "chunk_rows": 4}, r"shard_rows: 10 must be a multiple of chunk_rows"),
    ({"hidden_dtype": "int8"}, "hidden_dtype must be a float dtype name"),
])
def test_bad_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        PrecomputeConfig.from_dict(values)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"'k' is not of the form key=value \(e.g. mode=topk"):
        PrecomputeConfig.load(None, ["k"])


def test_cli_needs_paths(capsys):
    assert main(["precompute", "mode=topk"]) == 2
    assert "missing teacher, tokens, out" in capsys.readouterr().err
