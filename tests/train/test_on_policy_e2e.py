"""On-policy runs through `kdjax.train.train`: example stores on disk, an online teacher
saved as a Hugging Face directory, rollouts inside the step; a run resumed from its
checkpoint equals the uninterrupted run bit for bit (the rollouts are reproduced from
the state's RNG, the step and each example's id); bad setups fail before any compile."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import quickstart
from kdjax.train.checkpoint import restore_student
from kdjax.train.config import config_from_dict
from kdjax.train.loop import train

SIZE = quickstart.SIZES["tiny"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kdjax.data.examples import build_example_store
    from kdjax.models import Decoder, DecoderConfig, load_tokenizer, save_pretrained

    out = tmp_path_factory.mktemp("onpolicy")
    paths = quickstart.make_data(out, SIZE, seed=0, progress=False)
    rng = np.random.default_rng(0)
    grammar = quickstart.Grammar()
    with open(out / "pairs.jsonl", "w") as f:
        for _ in range(40):
            words = grammar.sentence(int(rng.integers(4)), rng).split()
            cut = max(1, len(words) // 3)
            f.write(json.dumps({"prompt": " ".join(words[:cut]),
                                "response": " ".join(words[cut:])}) + "\n")
    build_example_store(str(out / "pairs.jsonl"), paths["tokenizer"], out / "examples",
                        prompt_len=8, completion_len=8, prompt_field="prompt",
                        response_field="response", eval_docs=8, overwrite=True,
                        progress=False)
    vocab = len(load_tokenizer(paths["tokenizer"]))
    teacher = Decoder(DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=2, tie_word_embeddings=True),
                      rngs=nnx.Rngs(1))
    save_pretrained(teacher, out / "teacher")
    return dict(paths, root=out, vocab=vocab, examples=str(out / "examples"))


def _config(setup, run_dir, **over):
    data = {"run_dir": str(run_dir), "steps": 4, "global_batch_size": 8, "seed": 0,
            "model": {"init": dict(vocab_size=setup["vocab"], hidden_size=16,
                                   intermediate_size=32, num_layers=1, num_heads=2),
                      "dtype": "float32"},
            "data": {"train": setup["examples"] + "/train",
                     "eval": setup["examples"] + "/eval", "tokenizer": setup["tokenizer"]},
            "teacher": {"path": str(setup["root"] / "teacher"), "dtype": "float32"},
            "objective": {"divergence": "jsd", "divergence_kwargs": {"beta": 0.5},
                          "on_policy": {"loss": "gkd", "fraction": 0.5,
                                        "max_new_tokens": 6}},
            "optimizer": {"lr": 1e-2, "warmup_steps": 0},
            "checkpoint": {"every": 2, "keep": 3, "async_save": False},
            "eval": {"every": 0, "batches": 1},
            "logging": {"every": 1, "progress": False, "tensorboard": False, "plot": False}}
    for key, value in over.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)


def _params(config):
    model, step = restore_student(config)
    return step, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_on_policy_run_resumes_bit_identically(setup, tmp_path):
    whole = _config(setup, tmp_path / "whole")
    summary = train(whole)
    assert summary["steps"] == 4 and np.isfinite(summary["eval"]["ce"])
    assert 0.0 <= summary["train"]["on_policy_fraction"] <= 1.0
    assert summary["train"]["completion_len"] >= 1
    part = _config(setup, tmp_path / "part")

    def stop(step, state, metrics):  # after step 2's checkpoint: an interrupted run
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, hooks=[stop])
    assert restore_student(part)[1] == 2
    resumed = train(part)
    assert resumed["resumed_from"] == 2
    (s1, p1), (s2, p2) = _params(whole), _params(_config(setup, tmp_path / "part"))
    assert s1 == s2 == 4
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("over, match", [
    ({"data__train": "PACKED"}, "example rows"),
    ({"teacher__path": None}, "online teacher"),
    ({"objective__on_policy__loss": "minillm", "teacher__path": None}, "online teacher"),
])
def test_bad_on_policy_setups_fail_before_compiling(setup, tmp_path, over, match):
    over = {k: setup["train"] if v == "PACKED" else v for k, v in over.items()}
    with pytest.raises(ValueError, match=match):
        train(_config(setup, tmp_path / "bad", **over))
    assert not (tmp_path / "bad" / "checkpoints").exists()
