"""What a new user runs into with `kdjax precompute` / `inspect` (and a store in `train`):
each mistake is one line on stderr and exit status 2 (3 for a damaged store), never a
traceback; a token store packed with another tokenizer is refused; a store that does not
belong to a run is refused naming the concrete cause first."""

import json
import re
import shutil

import pytest

from kdjax.cli import main
from kdjax.data import open_token_store
from kdjax.data.tokenize import tokenizer_fingerprint
from kdjax.storage import StoreMismatchError
from kdjax.teacher import open_teacher_store
from tests.teacher import helpers

WORDS = ["alpha", "beta", "gamma", "delta", "kd", "jax", "store", "shard", "teacher"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A teacher directory as transformers lays it out (config.json, safetensors and its
    own tokenizer), another tokenizer, token stores, and a top-k store the CLI wrote."""
    import numpy as np

    from kdjax.models import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=12)) for _ in range(30)]
    teacher = root / "teacher"
    tok_a = train_bpe_tokenizer(docs, 270, teacher)
    helpers.save_tiny_teacher(teacher, vocab_size=len(tok_a))
    tok_b = train_bpe_tokenizer(docs[:5], 262, root / "other_tokenizer")
    fp_a, fp_b = tokenizer_fingerprint(tok_a), tokenizer_fingerprint(tok_b)
    va, vb = len(tok_a), len(tok_b)
    tokens = {name: helpers.write_token_store(root / name, num_rows=12, shard_rows=4, **kw)
              for name, kw in {
                  "tokens": dict(vocab_size=va, tokenizer_fingerprint=fp_a),
                  # differs in everything: the tokenizer must be named first
                  "other_tokenizer": dict(vocab_size=vb, tokenizer_fingerprint=fp_b,
                                          seq_len=32, seed=1),
                  "other_vocab": dict(vocab_size=va - 1, tokenizer_fingerprint=fp_a,
                                      seq_len=32, seed=1),
                  "other_length": dict(vocab_size=va, tokenizer_fingerprint=fp_a,
                                       seq_len=32, seed=1),
                  "other_data": dict(vocab_size=va, tokenizer_fingerprint=fp_a, seed=1)}.items()}
    store = root / "store"
    assert main(["precompute", "--teacher", str(teacher), "--tokens", tokens["tokens"],
                 "--out", str(store), "--overwrite", "mode=topk", "k=4", "batch_size=8",
                 "shard_rows=4", "progress=false"]) == 0
    return dict(root=root, teacher=str(teacher), tokens=tokens, store=str(store),
                fp=(fp_a, fp_b), vocab=(va, vb))


def one_line_error(capsys, command: str) -> str:
    """The stderr of a failed command: exactly one line, naming the command, no traceback."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kdjax {command}: "), err
    return lines[0]


def test_precompute_refuses_a_token_store_of_another_tokenizer(world, capsys):
    out = world["root"] / "refused"
    assert main(["precompute", "--teacher", world["teacher"], "--tokens",
                 world["tokens"]["other_tokenizer"], "--out", str(out)]) == 2
    line = one_line_error(capsys, "precompute")
    (fp_a, fp_b), (va, vb) = world["fp"], world["vocab"]
    assert "packed with another tokenizer than the teacher's" in line
    assert f"{fp_b[:16]}…, vocabulary {vb} (the token store's)" in line
    assert f"{fp_a[:16]}…, vocabulary {va} (the teacher's" in line
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{root}/nowhere"], "teacher: teacher directory '{root}/nowhere' does not "
     "exist; pass a local Hugging Face model directory"),
    (["--teacher", "{root}/other_tokenizer"], "teacher directory '{root}/other_tokenizer' "
     "has no config.json"),
    (["--tokens", "{root}/nowhere"], "tokens: token store '{root}/nowhere' does not exist; "
     "pack one with `kdjax pack"),
    (["topk=16"], "unknown config key 'topk' (did you mean 'k'?)"),
    (["mode=top-k"], "mode: unknown value 'top-k' (did you mean 'topk'?)"),
    (["--config", "{root}/missing.yaml"], "config file '{root}/missing.yaml' does not exist"),
])
def test_precompute_mistakes_are_one_line(world, capsys, args, message):
    base = {"--teacher": world["teacher"], "--tokens": world["tokens"]["tokens"],
            "--out": str(world["root"] / "never")}
    args = [a.format(root=world["root"]) for a in args]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    assert main(["precompute", *args]) == 2
    assert message.format(root=world["root"]) in one_line_error(capsys, "precompute")


def test_overwrite_is_a_flag_too():
    from kdjax.cli import build_parser
    from kdjax.teacher.cli import precompute_config

    def config(*extra):
        args = build_parser().parse_args(["precompute", "--teacher", "t", "--tokens", "d",
                                          "--out", "o", *extra])
        return precompute_config(args)

    assert config("--overwrite").overwrite and config("overwrite=true").overwrite
    assert not config().overwrite


def test_debug_shows_the_traceback(world, monkeypatch):
    args = ["precompute", "--teacher", str(world["root"] / "nowhere"), "--tokens", "t",
            "--out", "o"]
    with pytest.raises(ValueError, match="does not exist"):
        main([*args, "--debug"])
    monkeypatch.setenv("KDJAX_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(args)


def test_precompute_says_when_it_resumes(world, tmp_path, capsys):
    store = shutil.copytree(world["store"], tmp_path / "store")
    (store / "ledger" / "shard-000001.json").unlink()  # as if killed before shard 1
    argv = ["precompute", "--teacher", world["teacher"], "--tokens", world["tokens"]["tokens"],
            "--out", str(store), "mode=topk", "k=4", "batch_size=8", "shard_rows=4",
            "progress=false"]
    assert main(argv) == 0
    assert (f"resuming {store}: 2 of 3 shards already written, 1 to compute"
            in capsys.readouterr().out)
    assert main(argv) == 0
    assert "already holds all 3 shards; nothing to compute" in capsys.readouterr().out


def test_inspect_says_what_it_did_not_check(world, capsys):
    assert main(["inspect", world["store"], "--no-check"]) == 0
    text = capsys.readouterr().out
    assert "chunks NOT checked (--no-check)" in text and "intact" not in text
    assert main(["inspect", world["store"]]) == 0
    text = capsys.readouterr().out
    assert "every chunk read back intact (crc32c)" in text and "NOT checked" not in text
    assert "ids stored/position 4.00" in text


def test_inspect_of_an_incomplete_store_counts_the_rows_written(world, tmp_path, capsys):
    store = shutil.copytree(world["store"], tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (store / "ledger" / "shard-000002.json").unlink()
    for shard in store.glob("arrays/*/c/2"):  # shard 2 (rows [8, 12)) never written
        shutil.rmtree(shard)
    assert main(["inspect", str(store)]) == 0
    text = capsys.readouterr().out
    assert "complete: False (1 shards missing)" in text and "CORRUPT" not in text
    line = next(ln for ln in text.splitlines() if "size on disk" in ln)
    assert "bytes/token over the 8 rows written so far" in line
    disk, signal = map(float, re.search(r": ([\d.]+) bytes/token.*\(([\d.]+) of them",
                                        line).groups())
    assert disk > signal  # the signal is part of what is on disk


@pytest.mark.parametrize("damage, status, message", [
    ("nothing", 2, "teacher store '{path}' does not exist; pass the directory `kdjax "
     "precompute` wrote"),
    ("zarr.json", 3, "cannot open array '{path}/arrays/ids': DATA_LOSS"),
    ("manifest", 3, "'{path}/manifest.json' is not valid JSON"),
])
def test_inspect_of_a_missing_or_damaged_store_is_one_line(world, tmp_path, capsys, damage,
                                                           status, message):
    path = tmp_path / "store"
    if damage != "nothing":
        shutil.copytree(world["store"], path)
        name = "arrays/ids/zarr.json" if damage == "zarr.json" else "manifest.json"
        (path / name).write_text('{"broken')
    assert main(["inspect", str(path)]) == status
    line = one_line_error(capsys, "inspect")
    assert message.format(path=path) in line
    assert "tensorstore_spec" not in line


@pytest.mark.parametrize("tokens, cause", [
    ("other_tokenizer", "it was computed on tokens from another tokenizer: its "
     "tokenizer_fingerprint is"),
    ("other_vocab", "it was computed on tokens from another vocabulary: its "
     "tokenizer_vocab_size is {va} but the run has {va1}"),
    ("other_length", "it was computed on rows of another sequence length: its seq_len is 16 "
     "but the run has 32"),
    ("other_data", "it was computed on other data (same tokenizer and sequence length): its "
     "data_fingerprint is"),
])
def test_a_mismatched_store_names_the_cause_in_order(world, tokens, cause):
    """Each token store differs from the store's in this cause and every later one."""
    va = world["vocab"][0]
    store = open_teacher_store(world["store"])
    with pytest.raises(StoreMismatchError) as err:
        store.check_compatible(open_token_store(world["tokens"][tokens]), vocab_size=va)
    assert cause.format(va=va, va1=va - 1) in str(err.value)
    if tokens == "other_tokenizer":
        assert f"vocabulary {va} vs {world['vocab'][1]}" in str(err.value)


def test_train_refuses_a_store_of_another_sequence_length(world, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(f"run_dir: {tmp_path / 'run'}\nsteps: 2\nglobal_batch_size: 8\n"
                   f"data: {{train: {world['tokens']['other_length']}}}\n"
                   f"store: {{path: {world['store']}}}\nmesh: {{data: -1}}\n"
                   "logging: {progress: false}\n"
                   f"model: {{init: {{vocab_size: {world['vocab'][0]}, hidden_size: 16, "
                   "intermediate_size: 32, num_layers: 1, num_heads: 2}}\n")
    assert main(["train", "--config", str(run)]) == 2
    assert "another sequence length: its seq_len is 16 but the run has 32" in one_line_error(
        capsys, "train")
    assert main(["train", "--config", str(run), "store.path=" + str(tmp_path / "nowhere")]) == 2
    assert f"store.path: teacher store '{tmp_path / 'nowhere'}' does not exist" in (
        one_line_error(capsys, "train"))


def test_overrides_after_a_flag_are_kept(world, capsys):
    assert main(["precompute", "--teacher", world["teacher"], "k=4", "--tokens",
                 world["tokens"]["tokens"], "--out", "o", "topk=3"]) == 2
    assert "unknown config key 'topk'" in one_line_error(capsys, "precompute")


def test_tokenizer_setting_names_the_teachers_tokenizer(world, tmp_path, capsys):
    """`tokenizer=DIR` overrides the teacher directory's own; a teacher directory without
    tokenizer files is not checked, and the run says so."""
    from kdjax.teacher import PrecomputeConfig
    from kdjax.teacher.precompute import check_tokenizer

    other = open_token_store(world["tokens"]["other_tokenizer"])
    check_tokenizer(PrecomputeConfig(teacher=world["teacher"], progress=False,
                                     tokenizer=str(world["root"] / "other_tokenizer")), other)
    bare = tmp_path / "bare-teacher"
    bare.mkdir()
    shutil.copy(f"{world['teacher']}/config.json", bare)
    check_tokenizer(PrecomputeConfig(teacher=str(bare)), other)
    assert "holds no tokenizer, so the token store's tokenizer is not checked" in (
        capsys.readouterr().out)


def test_summary_and_inspect_name_ids_drawn_and_ids_stored_apart():
    from kdjax.teacher.inspect import report_lines
    from kdjax.teacher.progress import summary_lines

    m = {"mode": "sampled", "num_samples": 64, "num_slots": 32, "seed": 0, "temperature": 1.0,
         "num_rows": 4, "seq_len": 8, "vocab_size": 100, "k": None, "arrays": {},
         "stats": {"mass_covered": 0.9, "distinct_per_position": 23.34,
                   "overflow_rate": 0.1, "dropped_sample_rate": 0.01},
         "store_format": "kdjax.teacher_store", "store_format_version": 1,
         "shard_rows": 4, "chunk_rows": 1, "teacher_fingerprint": "t" * 64,
         "tokenizer_fingerprint": "k" * 64, "data_fingerprint": "d" * 64}
    summary = "\n".join(summary_lines({"manifest": m, "path": "/nonexistent", "shards": 1,
                                       "rows": 4, "seconds": 1.0, "tokens_per_s": 32.0}))
    assert "distinct ids drawn/position 23.34 (before the U=32 slot cap)" in summary
    report = {"path": "s", "manifest": m, "complete": True, "missing_shards": [],
              "rows_written": 4, "disk_bytes": 1000, "disk_bytes_per_token": 31.25,
              "signal_bytes_per_token": 24.0, "problems": [], "checked": True,
              "distinct_per_position": 23.34, "stored_ids_per_position": 20.54,
              "sample_fraction_kept": 0.99, "mass_covered": None}
    text = "\n".join(report_lines(report))
    assert "distinct ids drawn/position 23.34 (before the U=32 slot cap)" in text
    assert "ids stored/position 20.54 (after the slot cap)" in text
