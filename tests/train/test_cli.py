"""`kdjax train | eval | export` wiring: config errors exit 2 with a message, the resolved
config prints, and export writes a checkpoint's student as a loadable HF directory."""

import argparse
import json

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax.models import Decoder, from_pretrained
from kdjax.train import cli
from kdjax.train.checkpoint import Checkpointer, write_run_config
from kdjax.train.config import load_config

MODEL = ("model.init={vocab_size: 64, hidden_size: 16, intermediate_size: 32, num_layers: 2, "
         "num_heads: 2, num_kv_heads: 1}")


def main(argv):
    """`kdjax …` with only this module's subcommands (others may be mid-build), and the
    error handling of every command (`kdjax.cli.run_command`)."""
    from kdjax.cli import run_command

    parser = argparse.ArgumentParser(prog="kdjax")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return run_command(args)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\nsteps: 4\nglobal_batch_size: 8\n"
                    "data: {train: /tmp/none}\nobjective: {alpha: 1.0}\nmesh: {data: 1}\n")
    return path


def test_print_config_resolves_overrides(config_file, capsys):
    assert main(["train", "--config", str(config_file), "--print-config", MODEL,
                 "optimizer.lr=1e-3", "model.dtype=float32"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "num_layers: 2" in out and "dtype: float32" in out


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "did you mean 'optimizer.lr'"),
    ("micro_batches=3", "8 is not divisible by micro_batches 3"),
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
])
def test_bad_config_exits_2_with_a_message(config_file, capsys, override, message):
    assert main(["train", "--config", str(config_file), MODEL, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdjax train: ") and message in err


def test_eval_and_export_need_a_run_directory(tmp_path, config_file, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    config = load_config(config_file, [MODEL, f"run_dir={tmp_path / 'fresh'}"])
    write_run_config(config)  # a run that never reached its first checkpoint
    assert main(["export", config.run_dir, "--out", str(tmp_path / "hf")]) == 2
    assert "has no checkpoints yet" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "checkpoints").exists()  # and nothing was created


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: a raw corpus packed by `kdjax train`'s packing step, and a
    checkpoint at step 4 whose student weights no initializer would produce."""
    from kdjax.models import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kd", "jax"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 30)))) for _ in range(40)]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe_tokenizer(docs, 270, tmp / "tok")
    stores = tmp / "stores"
    config = load_config(None, [
        f"run_dir={tmp / 'run'}", "steps=4", "global_batch_size=8", "mesh.data=-1",
        MODEL.replace("64", "270"), "model.dtype=float32", "objective.alpha=1",
        "eval.batches=1", "logging.progress=false",
        f"data={{train: {stores / 'train'}, eval: {stores / 'eval'}, dataset: "
        f"{tmp / 'docs.jsonl'}, tokenizer: {tmp / 'tok'}, seq_len: 16, eval_fraction: 0.25}}"])
    packed = cli.pack_if_needed(config)
    cfg = config.model.decoder_config()
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
                          nnx.to_pure_dict(abstract))
    state = {"params": {"model": params, "proj": {"p": np.ones((16, 16), np.float32)}},
             "opt_state": {"mu": params}, "step": np.int32(4)}
    with Checkpointer(config) as ckpt:
        ckpt.save(4, state, wait=True)
    return config, params, packed


def test_train_packs_a_raw_dataset_first(run):
    from kdjax.data import open_token_store

    config, _, packed = run
    train = open_token_store(config.data.train)
    held_out = open_token_store(config.data.eval)
    assert train.seq_len == 16 and train.num_rows == packed["train"]["rows"]
    assert train.num_rows > held_out.num_rows >= 8
    assert cli.pack_if_needed(config) is None  # already packed: left alone


def test_eval_reports_the_checkpoint_cross_entropy(run, capsys):
    """CE of the first eval batch from the checkpointed weights, against a float64 NumPy
    log-softmax of the same model's logits on the same rows."""
    from kdjax.data import open_token_store

    config, params, _ = run
    assert main(["eval", config.run_dir, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = open_token_store(config.data.eval).read(np.arange(config.global_batch_size))
    cfg = config.model.decoder_config()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)

    @jax.jit
    def forward(state, rows):
        return nnx.merge(graphdef, state)(rows["tokens"], segment_ids=rows["segment_ids"],
                                          positions=rows["positions"]).logits

    logits = np.asarray(forward(state, {k: rows[k] for k in ("tokens", "segment_ids",
                                                             "positions")}), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    mask = rows["loss_mask"]
    assert result["step"] == 4 and result["tokens"] == mask.sum()
    np.testing.assert_allclose(result["ce"], nll[mask].mean(), rtol=2e-5)
    assert main(["eval", config.run_dir, "--step", "3"]) == 2  # no such checkpoint


def test_export_writes_the_checkpointed_student(run, tmp_path, capsys):
    config, params, _ = run
    out = tmp_path / "hf"
    assert main(["export", str(config.run_dir), "--out", str(out)]) == 0
    message = capsys.readouterr().out
    assert f"step 4 of {config.run_dir}" in message and "with the tokenizer" in message
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "tokenizer.json").exists()
    loaded = nnx.to_pure_dict(nnx.state(from_pretrained(out), nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.multiprocess
def test_two_processes_export_once(run, tmp_path):
    """`kdjax export` on 2 processes (jax.distributed on localhost): both restore the
    checkpoint, process 0 alone writes the directory and prints the summary."""
    import os
    import socket
    import subprocess
    import sys

    config, params, _ = run
    worker = os.path.join(os.path.dirname(__file__), "_mp_export_worker.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "hf"
    procs = [subprocess.Popen(
        [sys.executable, worker, str(port), str(i), str(config.run_dir), str(out),
         str(tmp_path / f"p{i}.json")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert got[0]["writes"] == [str(out)] and got[1]["writes"] == []
    assert "exported the student at step 4" in logs[0]
    assert "exported the student" not in logs[1]
    loaded = nnx.to_pure_dict(nnx.state(from_pretrained(out), nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_refuses_a_missing_tokenizer_before_writing(run, tmp_path, capsys):
    config, _, _ = run
    out = tmp_path / "hf"
    assert main(["export", str(config.run_dir), "--out", str(out), "--tokenizer",
                 str(tmp_path / "no-tokenizer")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_train_resumes_and_refuses_a_changed_config_early(run, monkeypatch, capsys):
    """`kdjax train` on a run directory with a checkpoint says it resumes, and refuses a
    changed config before anything is built (the loop itself is stubbed here)."""
    import kdjax.train.loop as loop

    config, _, _ = run
    calls = []
    monkeypatch.setattr(loop, "train", lambda c: calls.append(c) or {"steps": c.steps})
    saved = f"{config.run_dir}/config.yaml"
    assert main(["train", "--config", saved, "steps=8", "logging.every=2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {config.run_dir} from step 4" in out and "steps: 8" in out
    assert len(calls) == 1 and calls[0].steps == 8
    assert main(["train", "--config", saved, "optimizer.weight_decay=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "optimizer.weight_decay: 0.01 → 0.5" in err
    assert len(calls) == 1


def test_eval_compares_runs_and_plain_models_in_a_table(run, tmp_path, capsys):
    """`kdjax eval RUN_A RUN_B --model HF_DIR --data STORE`: one row each; the exported
    student evaluated as a plain model on the run's first eval batch has the run's CE."""
    import shutil

    config, _, _ = run
    other = shutil.copytree(config.run_dir, tmp_path / "moved-run")
    assert main(["eval", config.run_dir, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    hf = tmp_path / "hf"
    assert main(["export", config.run_dir, "--out", str(hf)]) == 0
    capsys.readouterr()
    assert main(["eval", config.run_dir, str(other), "--model", str(hf), "--data",
                 config.data.eval, "--batch-size", str(config.global_batch_size),
                 "--batches", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run / model | step | held-out CE | perplexity |")
    rows = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in lines[2:]}
    assert list(rows) == [config.run_dir, str(other), str(hf)]
    assert rows[str(hf)][1] == "-" and rows[str(other)][1] == "4"
    for cells in rows.values():
        assert float(cells[2]) == pytest.approx(single["ce"], abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["eval"], "nothing to evaluate"),
    (["eval", "{tmp}/nowhere"], "run directory '{tmp}/nowhere' does not exist"),
    (["eval", "--model", "{tmp}/nowhere", "--data", "{tmp}"], "--model: model directory "
     "'{tmp}/nowhere' does not exist"),
    (["eval", "--model", "{tmp}"], "--model needs --data"),
    (["eval", "{run}", "eval.batchs=2"], "unknown config key 'eval.batchs' (did you mean "
     "'eval.batches'?)"),
    (["export", "{tmp}/nowhere", "--out", "{tmp}/hf"], "run directory '{tmp}/nowhere' does "
     "not exist"),
])
def test_eval_and_export_mistakes_are_one_line(run, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=run[0].run_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"kdjax {argv[0]}: ")
    assert message.format(tmp=tmp_path) in err


def test_export_copies_the_generation_config(run, tmp_path):
    import shutil

    config, _, _ = run
    tokenizer = shutil.copytree(config.data.tokenizer, tmp_path / "tok")
    (tokenizer / "generation_config.json").write_text('{"eos_token_id": 2}')
    out = tmp_path / "hf"
    assert main(["export", config.run_dir, "--out", str(out), "--tokenizer",
                 str(tokenizer)]) == 0
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2}


def test_train_refuses_missing_directories_before_building(config_file, tmp_path, capsys):
    for override, message in (
            (f"model.path={tmp_path}/nowhere", f"model.path: model directory "
             f"'{tmp_path}/nowhere' does not exist"),
            (f"model.path={tmp_path}", f"model.path: model directory '{tmp_path}' has no "
             "config.json"),
            ("data.eval=/tmp/none-eval", "data.train: token store '/tmp/none' does not exist")):
        overrides = [override] if override.startswith("model.path") else [MODEL, override]
        assert main(["train", "--config", str(config_file), *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_quickstart_baseline_recipe_works_with_an_eval_store():
    """The hard-label baseline of configs/quickstart.yaml's header, on a config that also
    evaluates against a teacher store (store.eval_path) as the distilled run does."""
    import pathlib
    import re

    path = pathlib.Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    header = path.read_text().split("\n\n")[0].replace("\\\n#", "")
    recipe = re.search(r"kdjax train --config configs/quickstart\.yaml (objective\.alpha=1 .*)",
                       header).group(1).split()
    config = load_config(path, ["store.eval_path=runs/quickstart/teacher_store_eval", *recipe])
    assert config.store.path is None and config.objective.alpha == 1.0
    assert config.store.eval_path == "runs/quickstart/teacher_store_eval"
