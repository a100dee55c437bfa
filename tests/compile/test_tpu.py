"""Ahead-of-time TPU compiles of the shipped pod config (libtpu on a CPU host; skipped
without libtpu). The full-size compile (~2.5 min per step on 2 cores) runs in
benchmarks/scale.py; here the same config is shrunk through overrides."""

import json

from kdjax.cli import main

CONFIG = "configs/llama3_8b_to_1b_sampled_tpu.yaml"
SMALL = ["data.seq_len=128", "global_batch_size=8", "model.path=null",
         "model.init={vocab_size: 1024, hidden_size: 128, intermediate_size: 256, "
         "num_layers: 2, num_heads: 4, num_kv_heads: 2, tie_word_embeddings: true}"]


def _run(capsys, *argv):
    rc = main(["compile", "--config", CONFIG, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_shipped_config_fits_a_v5p_slice(capsys, tpu_devices):
    rc, out, err = _run(capsys, "--topology", "v5p:2x2x2", "--json", *SMALL)
    assert rc == 0, err
    result = json.loads(out)
    train = result["steps"]["train"]
    assert result["fits"] and result["target"]["chip"]["name"] == "TPU v5p"
    assert train["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}  # the config's fsdp: -1
    assert 0 < train["memory"]["total"] < result["target"]["hbm_bytes"] == 95 * 2**30
    roof = train["roofline"]
    assert roof["estimate"] and 0 < roof["mfu"] <= 1 and roof["step_s"] > 0
    # the synthetic sampled store (N=64 → uint8 counts, 1024 ids → uint16)
    assert any("synthetic sampled store" in n for n in result["notes"])


def test_student_too_large_is_refused_before_compiling(capsys, tpu_devices):
    rc, out, err = _run(capsys, "--topology", "v5e:2x2", "data.seq_len=128",
                        "model.path=/nowhere/Llama-3.1-8B", "mesh.data=-1", "mesh.fsdp=1")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1
    assert "GiB HBM of TPU v5e" in err and "opt_state 59.8 GiB" in err
    assert "largest is opt_state: shard the optimizer state: raise mesh.fsdp" in err


def test_temporaries_over_hbm_are_named(capsys, tpu_devices):
    rc, _, err = _run(capsys, "--topology", "v5e:2x2", *SMALL[2:], "data.seq_len=8192",
                      "global_batch_size=64", "objective.use_fused=false",
                      "model.init.vocab_size=32768")
    assert rc == 2 and "does not fit TPU v5e" in err and "HLO temporaries" in err
    assert "raise micro_batches" in err and len(err.strip().splitlines()) == 1
