"""End to end: precompute → train → checkpoint → resume → export → transformers loads it;
kill -9 mid-run then resume == uninterrupted; 2 processes (gloo) == 1 process.

One module-scoped fixture builds the tiny corpus, tokenizer, token stores, a random
teacher and its sampled store; every test trains a tiny student on them.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import quickstart
from kdjax.train.checkpoint import restore_student
from kdjax.train.config import config_from_dict
from kdjax.train.loop import NonFiniteError, train
from tests.tolerances import assert_close

SIZE = quickstart.SIZES["tiny"]
STUDENT = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from kdjax.models import Decoder, DecoderConfig, load_tokenizer, save_pretrained

    out = tmp_path_factory.mktemp("e2e")
    paths = quickstart.make_data(out, SIZE, seed=0, progress=False)
    vocab = len(load_tokenizer(paths["tokenizer"]))
    teacher = Decoder(DecoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_layers=1, num_heads=2, tie_word_embeddings=True),
                      rngs=nnx.Rngs(1))
    save_pretrained(teacher, out / "teacher")
    paths["store"] = quickstart.precompute_signal(out, str(out / "teacher"), paths["train"],
                                                  SIZE, seed=0, progress=False)
    paths["eval_store"] = quickstart.precompute_signal(
        out, str(out / "teacher"), paths["eval"], SIZE, seed=0, progress=False,
        name="teacher_store_eval")
    paths["vocab"], paths["root"] = vocab, out
    return paths


def _config(stores, run_dir, **over):
    data = {"run_dir": str(run_dir), "steps": 6, "global_batch_size": 8, "seed": 0,
            "model": {"init": dict(vocab_size=stores["vocab"], **STUDENT), "dtype": "float32"},
            "data": {"train": stores["train"], "eval": stores["eval"],
                     "tokenizer": stores["tokenizer"]},
            "store": {"path": stores["store"], "eval_path": stores["eval_store"]},
            "objective": {"alpha": 0.2},
            "optimizer": {"lr": 1e-2, "warmup_steps": 1},
            "checkpoint": {"every": 2, "keep": 2, "async_save": True},
            "eval": {"every": 3, "batches": 1},
            "logging": {"every": 2, "progress": False, "tensorboard": True, "plot": True}}
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


def _same(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if tol:
            assert_close(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


def test_precompute_train_resume_export_and_transformers_loads(stores, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    calls = []
    config = _config(stores, tmp_path / "run", steps=4)
    summary = train(config, hooks=[lambda step, state, m: calls.append(step)])
    assert calls == [1, 2, 3, 4] and summary["final_checkpoint_step"] == 4
    assert {"ce", "perplexity", "kl_teacher", "top1_agreement"} <= set(summary["eval"])
    for key in ("metrics_jsonl", "tensorboard", "curves_png"):
        assert os.path.exists(summary[key]), key
    resumed = train(config.replace("steps=6"))
    assert resumed["resumed_from"] == 4 and resumed["final_checkpoint_step"] == 6
    # eval.every=3: one eval record per eval step, the last step's not written twice;
    # step throughput leaves eval and checkpoint time out, wall throughput keeps it
    from kdjax.train.metrics import read_jsonl

    records = read_jsonl(resumed["metrics_jsonl"])
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 4, 6]
    assert all(r["tokens_per_s"] >= r["wall_tokens_per_s"] > 0
               for r in records if r["split"] == "train")
    from kdjax.cli import main

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model, _ = restore_student(config.replace("steps=6"))
    tokens = np.random.default_rng(0).integers(0, stores["vocab"], (2, 12))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.double().numpy()
    assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)


def test_nonfinite_run_stops_with_a_clear_message(stores, tmp_path):
    config = _config(stores, tmp_path / "nan", steps=8, optimizer__lr=1e30,
                     optimizer__clip_norm=None, optimizer__max_nonfinite=2, eval__every=0,
                     data__eval=None, store__eval_path=None)
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite updates"):
        train(config)



@pytest.mark.parametrize("over,match", [
    (dict(objective__temperature=2.0),
     r"store.path: the sampled store .* written at temperature 1.0 but "
     r"objective.temperature=2.0; set objective.temperature=1.0"),
    (dict(objective__temperature_schedule={"kind": "linear", "end": 2.0}),
     r"temperature_schedule='linear' moves T"),
])
def test_store_temperature_must_be_the_objectives(stores, tmp_path, over, match):
    """A sampled store holds draws at its own T: training at another T is refused before
    anything is built or written."""
    run_dir = tmp_path / "t"
    with pytest.raises(ValueError, match=match):
        train(_config(stores, run_dir, **over))
    assert not (run_dir / "checkpoints").exists()


def test_eval_store_must_be_at_temperature_one(stores, tmp_path):
    from kdjax.teacher import open_teacher_store
    from kdjax.train.loop import check_store_temperature

    store = open_teacher_store(stores["eval_store"])
    check_store_temperature(store, None, "store.eval_path")  # written at T = 1: accepted
    store.manifest = {**store.manifest, "temperature": 2.0}
    with pytest.raises(ValueError, match=r"store.eval_path: .* written at temperature 2.0, "
                       r"but eval reports KL\(teacher ‖ student\) at T = 1"):
        check_store_temperature(store, None, "store.eval_path")

_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from kdjax.train.config import load_config
    from kdjax.train.loop import train
    config = load_config(sys.argv[1])
    kill_at = int(sys.argv[2])
    def hook(step, state, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-run, mid async save
    train(config, hooks=[hook])
""")


def _train_subprocess(config, tmp_path, kill_at=0, devices=8):
    path = tmp_path / f"{os.path.basename(config.run_dir)}.yaml"
    config.to_yaml(path)
    env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-c", _DRIVER, str(path), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_kill9_then_resume_equals_uninterrupted(stores, tmp_path):
    whole = _config(stores, tmp_path / "whole", steps=7, eval__every=0)
    killed = _config(stores, tmp_path / "killed", steps=7, eval__every=0)
    # One device: bit-identity needs a fixed summation order, and the in-process CPU
    # all-reduce of 8 fake devices does not promise one (multi-device runs agree to ~1 ulp).
    r = _train_subprocess(whole, tmp_path, devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train_subprocess(killed, tmp_path, kill_at=5, devices=1)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert restore_student(killed)[1] in (2, 4)  # what survived the kill
    r = _train_subprocess(killed, tmp_path, devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    (s1, p1), (s2, p2) = _params(whole), _params(killed)
    assert s1 == s2 == 7
    _same(p1, p2)  # bit-identical


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(stores, tmp_path):
    single = _config(stores, tmp_path / "single", steps=3, eval__every=0, data__eval=None,
                     store__eval_path=None)
    train(single)  # one process, 8 devices
    multi = _config(stores, tmp_path / "multi", steps=3, eval__every=0, data__eval=None,
                    store__eval_path=None)
    path = tmp_path / "multi.yaml"
    multi.to_yaml(path)
    port = _free_port()
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "kdjax.cli", "train", "--config", str(path),
         "--num-processes", "2", "--process-id", str(i),
         "--coordinator-address", f"localhost:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    (s1, p1), (s2, p2) = _params(single), _params(multi)
    assert s1 == s2 == 3
    _same(p1, p2, rtol=1e-5, atol=1e-6)  # gloo sums in another order than in-process


def test_online_teacher_with_hidden_and_attention_terms(stores, tmp_path):
    config = _config(stores, tmp_path / "online", steps=2, store__path=None,
                     store__eval_path=None, teacher__path=str(stores["root"] / "teacher"),
                     teacher__dtype="float32", teacher__remat="none", eval__every=0,
                     checkpoint__every=0,
                     objective__hidden={"weight": 0.5, "layer_map": {1: 1}},
                     objective__attention={"weight": 0.5, "layer_map": {0: 0}})
    summary = train(config)
    state = summary["state"]
    assert state.params["proj"]["1_1"].shape == (16, 32)  # learned projection, trained
    assert {"kd", "hidden", "attention"} <= set(summary["train"])
    assert {"kl_teacher", "top1_agreement"} <= set(summary["eval"])  # online teacher eval
