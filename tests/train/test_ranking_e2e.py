"""The ranking objective through `kdjax.train.train`: a preference store in data.train
(`objective.ranking`), a synthetic preference (candidates that start with a given token
are preferred) that training learns; a stored-reference method without stored
log-probs, or a preference store without the objective, fail before any compile."""

import numpy as np
import pytest

from kdjax.data.preferences import build_preference_store
from kdjax.train.config import ConfigError, config_from_dict
from kdjax.train.loop import train

V, P, C, K, GOOD = 40, 4, 5, 3, 7


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    prompts, cands, scores = [], [], []
    for _ in range(64):
        prompts.append(rng.integers(3, V, rng.integers(2, P + 1)).tolist())
        row = [rng.integers(8, V, rng.integers(2, C + 1)).tolist() for _ in range(K)]
        good = int(rng.integers(K))
        row[good][0] = GOOD  # the preferred candidate starts with GOOD
        cands.append(row)
        scores.append([1.0 if j == good else float(rng.random() * 0.5) for j in range(K)])
    out = tmp_path_factory.mktemp("pref") / "train"
    build_preference_store(out, prompts, cands, scores, tokenizer="fp", vocab_size=V,
                           prompt_len=P, completion_len=C, pad_id=0)
    return str(out)


def _config(store, run_dir, **ranking):
    return config_from_dict({
        "run_dir": str(run_dir), "steps": 12, "global_batch_size": 16, "seed": 0,
        "model": {"init": dict(vocab_size=V, hidden_size=16, intermediate_size=32,
                               num_layers=1, num_heads=2), "dtype": "float32"},
        "data": {"train": store},
        "objective": {"ranking": ranking},
        "optimizer": {"lr": 3e-2, "warmup_steps": 0},
        "checkpoint": {"every": 0, "async_save": False},
        "eval": {"every": 0},
        "logging": {"every": 1, "progress": False, "tensorboard": False, "plot": False}})


def test_simpo_run_learns_the_preference(store, tmp_path):
    seen = []
    summary = train(_config(store, tmp_path / "simpo", method="simpo"),
                    hooks=[lambda step, state, m: seen.append(
                        (float(m["reward_accuracy"].mean()), float(m["loss"].mean())))])
    assert summary["steps"] == 12 and len(seen) == 12
    first, last = np.mean([a for a, _ in seen[:3]]), np.mean([a for a, _ in seen[-3:]])
    assert last > first and last >= 0.75, seen
    assert np.mean([x for _, x in seen[-3:]]) < np.mean([x for _, x in seen[:3]])


def test_stored_reference_missing_is_a_clear_error(store, tmp_path):
    with pytest.raises(ValueError, match="no reference log-probs"):
        train(_config(store, tmp_path / "dpo", method="dpo"))
    assert not (tmp_path / "dpo" / "checkpoints").exists()


def test_online_reference_needs_a_teacher(store, tmp_path):
    with pytest.raises(ConfigError, match="teacher.path"):
        _config(store, tmp_path / "x", method="dpo", reference="online")
