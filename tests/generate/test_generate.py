"""`kdjax generate` end to end on a tiny local model: records, resume after kill -9,
independence from batch size, stop strings, curation, expansion, SeqKD packing, and bad
settings."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from kdjax.generate.config import GenerateConfig
from kdjax.generate.dataset import GeneratedDataset, shard_path
from kdjax.generate.run import run_generate
from kdjax.models.sampling import trim_ids_at_stop_strings, truncate_at_stop_strings
from kdjax.schema import ConfigError
from tests.data.conftest import make_tokenizer, random_texts, write_jsonl

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
EXAMPLES = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from kdjax.data import build_example_store
    from kdjax.models import Decoder, DecoderConfig, save_pretrained

    root = tmp_path_factory.mktemp("gen")
    make_tokenizer(root / "model")
    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    model = Decoder(DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_layers=2, num_heads=4, num_kv_heads=2,
                                  eos_token_id=tok.eos_token_id, dtype="float32",
                                  param_dtype="float32"), rngs=nnx.Rngs(5))
    save_pretrained(model, root / "model")
    rng = np.random.default_rng(0)
    write_jsonl(root / "prompts.jsonl",
                [{"prompt": t} for t in random_texts(rng, EXAMPLES, max_words=8)])
    build_example_store(str(root / "prompts.jsonl"), str(root / "model"), root / "prompts",
                        prompt_len=24, prompt_field="prompt", progress=False)
    return root


def _config(setup, out, **over):
    values = dict(model=str(setup / "model"), prompts=str(setup / "prompts" / "train"),
                  out=str(out), n=2, max_new_tokens=6, temperature=1.0, top_k=50, seed=3,
                  batch_size=4, shard_examples=4, dtype="float32", progress=False,
                  filter={"near_duplicate": None})
    values.update(over)
    return GenerateConfig.load(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def _bytes(root):
    n = GeneratedDataset(root).manifest["num_shards"]
    return [shard_path(root, i).read_bytes() for i in range(n)]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "ref"
    summary = run_generate(_config(setup, out))
    return out, summary


def test_records_are_complete_and_consistent(setup, reference):
    out, summary = reference
    records = list(GeneratedDataset(out).records())
    assert len(records) == EXAMPLES * 2 == summary["records"]
    assert [(r["example_id"], r["sample_index"]) for r in records] == [
        (e, s) for e in range(EXAMPLES) for s in range(2)]
    for r in records:
        assert 1 <= len(r["completion_ids"]) <= 6 == len(r["completion_ids"]) or \
            r["finish_reason"] in ("eos", "stop")
        assert len(r["logprobs"]) == len(r["completion_ids"])
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["mean_logprob"] == pytest.approx(float(np.mean(r["logprobs"])), abs=1e-6)
        if r["finish_reason"] == "eos":
            assert r["completion_ids"][-1] == 2  # </s> kept in the completion
    # sampling with different keys: the two samples of an example differ somewhere
    pairs = [(records[i]["completion_ids"], records[i + 1]["completion_ids"])
             for i in range(0, len(records), 2)]
    assert any(a != b for a, b in pairs)
    assert (out / "curated" / "manifest.json").is_file()
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["records"]


def test_batch_size_and_buckets_do_not_change_the_output(setup, reference, tmp_path):
    out = tmp_path / "b3"
    run_generate(_config(setup, out, batch_size=3, buckets=[4, 24]))
    assert _bytes(out) == _bytes(reference[0])


_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from kdjax.generate.config import GenerateConfig
    from kdjax.generate.run import run_generate
    config = GenerateConfig.load(None, json.loads(sys.argv[1]))
    kill_after = int(sys.argv[2])
    def on_shard(shard, done):
        if done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    run_generate(config, on_shard=on_shard)
""")


def test_kill9_then_rerun_gives_the_same_bytes(setup, reference, tmp_path):
    out = tmp_path / "killed"
    config = _config(setup, out)
    overrides = [f"{k}={json.dumps(v)}" for k, v in config.to_dict().items()]
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(overrides), "1"],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    with pytest.raises(Exception, match="incomplete"):
        GeneratedDataset(out)
    done = sorted(p.name for p in (out / "ledger").iterdir())
    assert done == ["shard-000000.json"]
    summary = run_generate(config)
    assert summary["this_run_sequences"] == (EXAMPLES - 4) * 2  # only the missing shards
    assert _bytes(out) == _bytes(reference[0])


def test_stop_strings_trim_ids_and_text(setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(setup / "model"))
    ids = tok("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    decode = lambda i: tok.decode(i, skip_special_tokens=True)
    trimmed, hit = trim_ids_at_stop_strings(ids, ["brown"], decode)
    assert hit and "brown" in decode(trimmed) and "brown" not in decode(trimmed[:-1])
    assert truncate_at_stop_strings(decode(trimmed), ["brown"]) == ("the quick ", True)
    assert trim_ids_at_stop_strings(ids, ["cat"], decode) == (ids, False)


def test_stop_string_run_marks_finish_reason_stop(setup, tmp_path):
    out = tmp_path / "stop"
    run_generate(_config(setup, out, stop=["e"], n=1, temperature=0.0, top_k=None))
    records = list(GeneratedDataset(out).records())
    assert any(r["finish_reason"] == "stop" for r in records)
    for r in records:
        if r["finish_reason"] == "stop":
            assert "e" not in r["completion"]


def test_filter_command_and_pack_of_the_curated_dataset(setup, reference, tmp_path):
    from kdjax.cli import main
    from kdjax.data import build_token_store, open_token_store

    out = tmp_path / "filtered"
    assert main(["filter", str(reference[0]), "--out", str(out),
                 "filter.finished_only=false", "filter.min_tokens=3"]) == 0
    kept = list(GeneratedDataset(out).records())
    assert kept and all(len(r["completion_ids"]) >= 3 for r in kept)
    summary = build_token_store(str(out), str(setup / "model"), tmp_path / "seqkd",
                                seq_len=32, progress=False)
    store = open_token_store(summary["train"]["path"])
    assert store.num_rows >= 1
    curated = GeneratedDataset(reference[0] / "curated")
    if len(curated) == 0:  # the random model never finished: a clear refusal, not a crash
        with pytest.raises(ValueError, match="holds no records"):
            build_token_store(str(reference[0] / "curated"), str(setup / "model"),
                              tmp_path / "seqkd2", seq_len=32, progress=False)


def test_expand_grows_and_answers_instructions(setup, tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("the quick fox\nthe lazy dog jumps\ndata store shard\n")
    out = tmp_path / "expand"
    config = _config(setup, out, mode="expand", prompts=None, n=1,
                     expand={"seed_file": str(seeds), "num_instructions": 3, "max_rounds": 2,
                             "min_words": 1, "max_overlap": 1.0, "instruction_tokens": 6})
    summary = run_generate(config)
    c = summary["expansion"]
    assert c["proposed"] == c["accepted"] + c["unparsed"] + c["length"] + c["near_duplicate"]
    records = list(GeneratedDataset(out).records())
    lines = (out / "instructions.jsonl").read_text().splitlines()
    assert len(records) == len(lines) - 1 == c["accepted"]
    assert [r["instruction"] for r in records] == [json.loads(x)["instruction"]
                                                   for x in lines[1:]]
    again = run_generate(config)  # the instruction list is reused, nothing regenerated
    assert again["expansion"] == c and again["this_run_sequences"] == 0


@pytest.mark.parametrize("over,match", [
    (dict(n=0), r"^n: must be >= 1, got 0"),
    (dict(max_new_tokens=0), r"^max_new_tokens: must be >= 1, got 0"),
    (dict(top_p=1.5), r"^top_p: must be in \(0, 1\]"),
    (dict(prompts=None), r"^prompts: label mode needs an example store"),
    (dict(mode="expand", prompts=None), r"^expand.seed_file: expand mode needs a seed file"),
    (dict(stop=[""]), r"^stop: must be a list of non-empty strings"),
])
def test_bad_settings_are_refused(setup, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _config(setup, tmp_path / "x", **over)


def test_missing_inputs_are_refused_before_loading(setup, tmp_path):
    with pytest.raises(ConfigError, match=r"model: '/no/such/model' does not exist"):
        run_generate(_config(setup, tmp_path / "x", model="/no/such/model"))
    with pytest.raises(ConfigError, match=r"expand.seed_file: '/no/seeds.txt' does not"):
        run_generate(_config(setup, tmp_path / "x", mode="expand", prompts=None,
                             expand={"seed_file": "/no/seeds.txt"}))
    assert not (tmp_path / "x").exists()


_MP_DRIVER = textwrap.dedent("""
    import json, sys
    from kdjax.cli import main
    port, pid, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.exit(main(["generate", *overrides, "--num-processes", "2", "--process-id", pid,
                   "--coordinator-address", f"localhost:{port}"]))
""")


@pytest.mark.multiprocess
def test_two_processes_write_what_one_process_writes(setup, reference, tmp_path):
    """2 processes (jax.distributed on localhost, one CPU device each, the rows split over
    both): process 0 writes the same records as the one-process run on 8 devices: the
    same tokens, text and finish reasons; log-probs equal to float32 rounding (the
    per-device matmul shapes differ, so XLA:CPU may round the last bit differently)."""
    import socket

    out = tmp_path / "mp"
    config = _config(setup, out)
    overrides = [f"{k}={json.dumps(v)}" for k, v in config.to_dict().items()]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _MP_DRIVER, str(port), str(i),
                               json.dumps(overrides)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got, want = (list(GeneratedDataset(d).records()) for d in (out, reference[0]))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.pop("logprobs"), w.pop("logprobs"), rtol=1e-5)
        assert g.pop("mean_logprob") == pytest.approx(w.pop("mean_logprob"), rel=1e-5)
        assert g == w
