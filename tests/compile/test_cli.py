"""`kdjax compile`: fake CPU devices, the fit check and the one-line errors."""

import json

import pytest

from kdjax.cli import main
from kdjax.storage.dtypes import id_dtype

TEACHER = {"model_type": "llama", "vocab_size": 256, "hidden_size": 96, "intermediate_size": 192,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture
def tiny(tmp_path):
    """(config path, teacher dir) of a tiny offline top-k run whose data is not on disk."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(TEACHER))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
run_dir: {tmp_path}/run
steps: 10
global_batch_size: 16
model:
  init: {{vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_layers: 2,
          num_heads: 4, num_kv_heads: 2}}
  dtype: float32
data: {{train: {tmp_path}/tokens/train, seq_len: 64}}
store: {{path: {tmp_path}/store, mode: topk}}
objective: {{alpha: 0.1}}
mesh: {{data: 2, fsdp: -1}}
""")
    return str(config), str(tmp_path / "teacher")


def _run(capsys, *argv):
    rc = main(["compile", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_all_steps_on_8_fake_devices(tiny, capsys):
    config, teacher = tiny
    rc, out, err = _run(capsys, "--config", config, "--devices", "8", "--step", "all",
                        "--teacher", teacher, "--precompute", "k=16", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["fits"] and result["target"]["devices"] == 8
    train, ev, pre = (result["steps"][k] for k in ("train", "eval", "precompute"))
    assert train["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    # 2 rows × 64 tokens per device: 4 int32 arrays + bool loss_mask + the top-k store's
    # ids (uint16 for 256 ids) and f32 log-probs (k=16)
    ids = id_dtype(256).itemsize
    assert train["memory"]["batch"] == 2 * 64 * (4 * 4 + 1 + 16 * (ids + 4))
    assert train["memory"]["opt_state"] > train["memory"]["params"] > 0
    assert train["memory"]["temporaries"] > 0 and train["roofline"] is None  # CPU: no peak
    for r in (train, ev, pre):
        f = r["flops"]
        assert f["model_per_device"] == pytest.approx(f["model_global"] / 8)
        assert f["hlo_per_device"] > 0
    assert train["collectives"]["by_kind"]["all-gather"]["ops"] > 0  # FSDP weights
    assert not pre["collectives"]["by_kind"]  # precompute default mesh: pure data parallel
    assert pre["flops"]["model_student_global"] == 0 < pre["flops"]["model_teacher_global"]
    assert ev["flops"]["model_teacher_global"] == 0  # offline: the eval reads the store


def test_text_report_and_fit_limit(tiny, capsys):
    config, _ = tiny
    rc, out, err = _run(capsys, "--config", config, "--devices", "8", "--hbm-gib", "1")
    assert rc == 0, err
    assert "train step: compiled in" in out and "memory/device:" in out
    assert "collectives/device/step:" in out and out.strip().splitlines()[-1].startswith(
        "fits: train step(s) on 8 × cpu")


def test_over_the_limit_names_the_overflow(tiny, capsys):
    config, _ = tiny
    rc, out, err = _run(capsys, "--config", config, "--devices", "8", "--hbm-gib", "1e-6")
    assert rc == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0] and "inputs alone" in lines[0]
    assert "largest is opt_state: shard the optimizer state: raise mesh.fsdp" in lines[0]
    # a limit above the inputs but below their total with temporaries fails after compiling
    rc, out, _ = _run(capsys, "--config", config, "--devices", "8", "--json")
    memory = json.loads(out)["steps"]["train"]["memory"]
    limit = (memory["arguments"] + memory["total"]) / 2
    assert memory["total"] > limit > memory["arguments"]
    rc, out, err = _run(capsys, "--config", config, "--devices", "8", "--hbm-gib",
                        str(limit / 2**30))
    assert rc == 2 and "train step: per-device memory" in err and "temporaries" in err
    assert "inputs alone" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("mesh.data=3", "do not divide"),
    ("data.seq_len=null", "data.seq_len is not set; add data.seq_len="),
    ("store.mode=null", "store.mode is not set"),
    ("mesh.fsdp=x", "mesh.fsdp"),
])
def test_clear_errors_without_tracebacks(tiny, capsys, override, message):
    config, _ = tiny
    rc, _, err = _run(capsys, "--config", config, "--devices", "8", override)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_precompute_needs_a_teacher(tiny, capsys):
    rc, _, err = _run(capsys, "--config", tiny[0], "--devices", "8", "--step", "precompute")
    assert rc == 2 and "--teacher PATH" in err


def test_too_many_devices_for_this_process(tiny, capsys):
    rc, _, err = _run(capsys, "--config", tiny[0], "--devices", "64")
    assert rc == 2 and "xla_force_host_platform_device_count=64" in err


def test_bad_topology_name(tiny, capsys, tpu_devices):
    rc, _, err = _run(capsys, "--config", tiny[0], "--topology", "v9z:2x2")
    assert rc == 2 and "unknown TPU topology 'v9z:2x2'" in err and "v5p:2x4x4" in err
