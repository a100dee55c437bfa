"""Config: YAML ⇄ frozen dataclasses, overrides, and clear errors for bad configs."""

import dataclasses
import json
import pathlib

import jax
import pytest
import yaml

from kdjax.catalog import DIVERGENCES
from kdjax.train.config import (
    Config,
    ConfigError,
    Schedule,
    apply_overrides,
    config_from_dict,
    load_config,
)

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"

TINY = {
    "run_dir": "/tmp/kdjax-test-run",
    "steps": 20,
    "global_batch_size": 16,
    "model": {"init": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                       "num_layers": 2, "num_heads": 4}, "dtype": "float32"},
    "data": {"train": "/tmp/tokens/train", "eval": "/tmp/tokens/eval"},
    "store": {"path": "/tmp/store", "mode": "sampled"},
    "objective": {"temperature": 2.0, "alpha": 0.2},
    "optimizer": {"lr": 1e-3, "warmup_steps": 2},
    "mesh": {"data": 2},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _error(overrides, path=None, match=None):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides)
    return str(info.value)


def test_load_and_round_trip(tiny_yaml, tmp_path):
    config = load_config(tiny_yaml, [])
    assert isinstance(config, Config)
    assert config.objective.temperature == 2.0 and config.optimizer.lr == 1e-3
    assert config.model.vocab_size == 96
    assert config.model.decoder_config().num_layers == 2
    # YAML file → Config → YAML file → the same Config and fingerprint
    config.to_yaml(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml", [])
    assert again == config and again.fingerprint() == config.fingerprint()
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3


def test_overrides_are_yaml_typed_and_change_the_fingerprint(tiny_yaml):
    base = load_config(tiny_yaml, [])
    config = load_config(tiny_yaml, [
        "optimizer.lr=3e-4",  # PyYAML reads this as a string: still a float field
        "steps=40", "optimizer.clip_norm=null", "objective.hidden.layer_map={0: 1}",
        "objective.hidden.weight=0.5", "objective.divergence=jsd", "store.mode=dense",
        "objective.divergence_kwargs.beta=0.3", "model.init.num_layers=3",
        "objective.temperature_schedule={kind: linear, end: 1.0}",
    ])
    assert config.optimizer.lr == pytest.approx(3e-4) and config.steps == 40
    assert config.optimizer.clip_norm is None
    assert config.objective.hidden.layer_map == {0: 1}
    assert config.objective.divergence_kwargs == {"beta": 0.3}
    assert config.model.init["num_layers"] == 3
    assert config.fingerprint() != base.fingerprint()
    assert apply_overrides(base, ["steps=40"]).steps == 40
    assert base.replace("seed=3").seed == 3 and base.seed == 0


@pytest.mark.parametrize("override, key, suggestion", [
    ("optimizer.lrr=1e-3", "optimizer.lrr", "optimizer.lr"),
    ("objective.temprature=2", "objective.temprature", "objective.temperature"),
    ("lr=1e-3", "'lr'", "optimizer.lr"),  # a key put in the wrong section
    ("checkpoint.kep=2", "checkpoint.kep", "checkpoint.keep"),
])
def test_unknown_key_names_the_nearest(tiny_yaml, override, key, suggestion):
    message = _error([override], tiny_yaml)
    assert key in message and f"did you mean '{suggestion}'" in message


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "optimizer": {"learning_rate": 1e-3}}))
    message = _error([], path)
    assert "optimizer.learning_rate" in message and "optimizer.lr" in message


@pytest.mark.parametrize("override, match", [
    ("steps=abc", r"steps: expected int, got str 'abc'"),
    ("optimizer.lr=fast", r"optimizer.lr: expected float, got str 'fast'"),
    ("logging.jsonl=3", r"logging.jsonl: expected bool"),
    ("data.train=12", r"data.train: expected str.*quote it"),
    ("optimizer=3", r"optimizer: expected a mapping of OptimizerConfig fields, got int 3"),
    ("steps=null", r"steps: a value is required"),
])
def test_bad_type(tiny_yaml, override, match):
    with pytest.raises(TypeError, match=match):
        load_config(tiny_yaml, [override])


@pytest.mark.parametrize("overrides, match", [
    (["optimizer.lr=-1e-3"], r"optimizer.lr: must be > 0, got -0.001"),
    (["objective.temperature=0"], r"objective.temperature: must be > 0"),
    (["objective.alpha=1.5"], r"objective.alpha: must be in \[0, 1\], got 1.5"),
    (["global_batch_size=15", "store.mode=null"],
     r"global_batch_size: 15 is not divisible by micro_batches 1 × data parallelism 2"),
    (["micro_batches=3"], r"16 is not divisible by micro_batches 3"),
    (["objective.divergence=kl"], r"objective.divergence: unknown value 'kl'"),
    (["objective.divergence=jsd"], r"a sampled store supports forward_kl only"),
    (["store.path=null"], r"needs a teacher signal: set store.path"),
    (["teacher.path=/x"], r"not both"),
    (["store.mode=top"], r"store.mode: unknown value 'top' \(did you mean 'topk'\?\)"),
    (["objective.divergence_kwargs.bta=1"], r"forward_kl takes no argument 'bta'"),
    (["store.mode=null", "objective.divergence=alpha_beta_divergence"],
     r"needs \['alpha', 'beta'\]"),
    (["objective.hidden.weight=1"], r"hidden.weight > 0 needs a layer_map"),
    (["objective.hidden.layer_map={0: -1}"], r"ints >= 0\), got 0: -1"),
    (["objective.hidden={weight: 1, layer_map: {3: 1}}"],
     r"student residual-stream indices \[3\] exceed its num_layers=2 \(valid: 0..2\)"),
    (["objective.attention={weight: 1, layer_map: {0: 0}}"], r"needs an online teacher"),
    (["store.path=null", "store.mode=null", "teacher.path=/no/such/dir",
      "objective.attention={weight: 1, layer_map: {2: 0}}"], r"block indices \[2\] out of"),
    (["objective.temperature_schedule.kind=linear"],
     r"objective.temperature_schedule.end: a linear schedule needs an end value"),
    (["mesh.data=-1", "mesh.fsdp=-1"], r"at most one axis may be -1"),
    (["model.init.hiden_size=8"], r"did you mean 'hidden_size'"),
    (["model.init.num_kv_heads=3"], r"model.init: .*multiple of num_kv_heads=3"),
    (["model.path=/x"], r"give exactly one of model.path"),
    (["optimizer.warmup_steps=50"], r"optimizer.warmup_steps: 50 exceeds steps=20"),
    (["steps=0"], r"steps: must be >= 1, got 0"),
    (["data.dataset=docs.jsonl"], r"packing a dataset needs data.tokenizer and data.seq_len"),
    (["data={train: /s/rows, dataset: d.jsonl, tokenizer: t, seq_len: 8}"],
     r"data.train must end in /train, got '/s/rows'"),
    (["data={train: /s/train, eval: /x/eval, dataset: d, tokenizer: t, seq_len: 8, "
      "eval_fraction: 0.1}"], r"set data.eval=/s/eval"),
    (["steps"], r"not of the form key.sub=value"),
    (["model.attention_impl=flash"], r"model.attention_impl"),
    (["optimizer.lr.x=1"], r"'optimizer.lr' is a value, not a section"),
])
def test_bad_value_gives_a_clear_error(tiny_yaml, overrides, match):
    _error(overrides, tiny_yaml, match)


def test_missing_required_key_and_missing_file(tmp_path):
    _error(["run_dir=/tmp/x", "steps=3", "global_batch_size=2"], match="'model'")
    _error([], tmp_path / "nope.yaml", match="does not exist")


def _checkpoint_error(overrides, path, match):
    config = load_config(path, overrides)  # parsing never reads a checkpoint
    with pytest.raises(ConfigError, match=match):
        config.check_checkpoints()


def test_vocab_mismatch_with_local_teacher(tiny_yaml, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"vocab_size": 128}))
    online = ["store.path=null", "store.mode=null", f"teacher.path={teacher}"]
    _checkpoint_error(online, tiny_yaml,
                      r"teacher vocab_size 128 differs from student vocab_size 96")
    config = load_config(tiny_yaml, [*online, "teacher.truncate_vocab=true"])
    config.check_checkpoints()
    assert config.teacher.vocab_size == 128
    (teacher / "config.json").write_text(json.dumps({"vocab_size": 96, "num_hidden_layers": 4}))
    hidden = [*online, "objective.hidden={weight: 1, layer_map: {2: 4}}"]
    load_config(tiny_yaml, hidden).check_checkpoints()
    assert load_config(tiny_yaml, hidden).teacher.num_layers == 4
    _checkpoint_error([*online, "objective.hidden={weight: 1, layer_map: {2: 5}}"], tiny_yaml,
                      r"teacher residual-stream indices \[5\] exceed its num_layers=4")


def test_parsing_reads_no_checkpoint(tiny_yaml, tmp_path):
    """A model.path that does not exist (yet) loads; the trainer's checks come later."""
    student = tmp_path / "student"
    config = load_config(tiny_yaml, ["model.init=null", f"model.path={student}",
                                     "objective.hidden={weight: 1, layer_map: {9: 1}}"])
    config.check_checkpoints()  # nothing to compare yet
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"vocab_size": 96, "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match=r"student residual-stream indices \[9\] exceed"):
        config.check_checkpoints()


def test_check_devices_resolves_the_mesh(tiny_yaml):
    config = load_config(tiny_yaml, ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    assert config.check_devices(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"16 is not divisible .* data parallelism 64"):
        config.replace("mesh.tensor=1").check_devices(64)
    with pytest.raises(ConfigError, match="do not divide"):
        config.check_devices(6)


def test_online_teacher_computes_in_bfloat16_unless_asked(tiny_yaml, tmp_path):
    """The teacher default is bf16 (weights too: `build_teacher` loads params in it)."""
    from kdjax.models import DecoderConfig, init_decoder, save_pretrained
    from kdjax.train.loop import build_teacher

    path = save_pretrained(init_decoder(DecoderConfig(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)),
        tmp_path / "teacher")
    online = ["store.path=null", "store.mode=null", f"teacher.path={path}"]
    assert load_config(tiny_yaml, online).teacher.dtype == "bfloat16"
    assert load_config(tiny_yaml, [*online, "teacher.dtype=float32"]).teacher.dtype == "float32"
    _error([*online, "teacher.dtype=fp8"], tiny_yaml, "teacher.dtype")
    _, params, _ = build_teacher(str(path), "bfloat16", mesh=None)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}


def test_every_divergence_is_accepted(tiny_yaml):
    for name in DIVERGENCES:
        extra = ["objective.divergence_kwargs={alpha: 0.5, beta: 0.5}"] if name == (
            "alpha_beta_divergence") else []
        config = load_config(tiny_yaml, [f"objective.divergence={name}", "store.mode=dense",
                                         *extra])
        assert config.objective.divergence == name


def test_schedules_match_their_formulas():
    import numpy as np

    lin, cos = Schedule("linear", end=1.0), Schedule("cosine", end=0.0, steps=10)
    assert Schedule().build(2.0, 100) == 2.0
    for step in (0, 3, 50, 100, 150):
        frac = min(step / 100, 1.0)
        np.testing.assert_allclose(lin.build(4.0, 100)(step), 4.0 - 3.0 * frac, rtol=1e-6)
        frac = min(step / 10, 1.0)
        np.testing.assert_allclose(cos.value(1.0, step, 100),
                                   0.5 * (1 + np.cos(np.pi * frac)), rtol=1e-6, atol=1e-7)


# devices each shipped config is written for (its header says which machine)
DEVICES = {"quickstart": 1, "llama3_8b_to_1b_sampled_tpu": 32,
           "qwen25_7b_to_05b_online_gpu": 8, "hidden_state_distill": 1}


def test_every_shipped_config_loads(tmp_path):
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"quickstart.yaml"}
    for path in paths:
        text = path.read_text()
        assert text.startswith("#") and "kdjax " in text.split("\n\n")[0], (
            f"{path.name} must start with a comment saying how to run it")
        config = load_config(path, [f"run_dir={tmp_path / path.stem}"])
        config.check_devices(DEVICES[path.stem])


def test_quickstart_yaml_is_the_quickstart_distillation_run():
    """configs/quickstart.yaml must stay in sync with what `kdjax quickstart` trains."""
    quickstart = pytest.importorskip("kdjax.quickstart")
    out = pathlib.Path("runs/quickstart")
    size = quickstart.SIZES["default"]
    expected = quickstart.train_config(
        out, "distilled", size=size, seed=0, vocab=384, data=str(out / "tokens" / "train"),
        eval_data=str(out / "tokens" / "eval"), steps=size["student_steps"],
        batch=size["student_batch"], dims=size["student"], lr=3e-3,
        store=str(out / "teacher_store"), alpha=0.0)
    shipped = load_config(CONFIGS / "quickstart.yaml", [])
    # the tokenizer path is informational (used by export), the rest must agree
    assert shipped.replace("data.tokenizer=null").to_dict() == expected.to_dict()


def test_model_section_reaches_the_decoder(tiny_yaml):
    """attention_impl and scan_layers of the model section are the decoder's settings."""
    config = load_config(tiny_yaml, ["model.attention_impl=xla", "model.scan_layers=false",
                                     "model.remat=full"])
    cfg = config.model.decoder_config()
    assert (cfg.attention_impl, cfg.scan_layers, cfg.remat) == ("xla", False, "full")
    default = load_config(tiny_yaml, []).model.decoder_config()
    assert (default.attention_impl, default.scan_layers) == ("auto", True)
