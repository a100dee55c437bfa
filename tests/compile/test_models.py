"""Chip table, model FLOPs and built-in architectures (no compilation)."""

import types

import pytest

from kdjax.compile import chips, flops, presets
from kdjax.models import DecoderConfig
from kdjax.train import metrics


@pytest.mark.parametrize("kind, name, peak", [
    ("TPU v4", "TPU v4", 275e12), ("TPU v5 lite", "TPU v5e", 197e12),
    ("TPU v5", "TPU v5p", 459e12), ("TPU v5p", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12), ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989e12),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989e12), ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB",
                                                 312e12)])
def test_chip_table_matches_device_kinds(kind, name, peak):
    chip = chips.chip_for(kind)
    assert chip.name == name and chip.peak_flops == peak
    assert chip.hbm_bytes > 8 * 2**30 and chip.hbm_bandwidth > 5e11 and chip.ici_bandwidth > 0
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_unknown_chips_have_no_ceiling():
    assert chips.chip_for("cpu") is None and chips.chip_for("Quantum X") is None
    assert chips.chip_for("TPU v5p").hbm_bytes == 95 * 2**30


TINY = DecoderConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_layers=2,
                     num_heads=4, num_kv_heads=2)


def test_model_flops_formula():
    tied = TINY.replace(tie_word_embeddings=True)
    assert flops.matmul_params(TINY) == TINY.num_params - 100 * 16  # lookup table left out
    assert flops.matmul_params(tied) == tied.num_params  # the table is the lm_head
    fwd = flops.forward_flops_per_token(TINY, 32)
    assert fwd == 2 * flops.matmul_params(TINY) + 4 * 2 * 32 * 16
    windowed = TINY.replace(family="mistral", sliding_window=8)
    assert flops.forward_flops_per_token(windowed, 32) == 2 * flops.matmul_params(TINY) + (
        4 * 2 * 8 * 16)
    train = flops.step_flops("train", tokens=64, seq_len=32, student=TINY, teacher=tied)
    assert train.student == 3 * fwd * 64
    assert train.teacher == flops.forward_flops_per_token(tied, 32) * 64
    assert train.attention == (3 + 1) * 4 * 2 * 32 * 16 * 64  # student 3 passes, teacher 1
    assert flops.step_flops("precompute", tokens=64, seq_len=32, student=TINY,
                            teacher=tied).student == 0
    counter = metrics.FlopCounter.from_models(TINY, 32, tied)
    assert counter.per_token == pytest.approx(train.total / 64)
    with pytest.raises(ValueError, match="step must be one of"):
        flops.step_flops("generate", tokens=1, seq_len=1)


@pytest.mark.parametrize("name, billions", [
    ("Llama-3.2-1B", 1.236), ("Llama-3.2-3B", 3.213), ("Llama-3.1-8B", 8.030),
    ("Qwen2.5-0.5B-Instruct", 0.494), ("Qwen2.5-7B-Instruct", 7.616)])
def test_builtin_architectures_have_the_published_sizes(name, billions):
    data, source = presets.hf_config(f"/not/here/{name}")
    assert "built-in" in source
    assert DecoderConfig.from_hf(data).num_params / 1e9 == pytest.approx(billions, rel=2e-3)


def test_local_config_wins_and_unknown_names_are_explained(tmp_path):
    (tmp_path / "Llama-3.2-1B").mkdir()
    (tmp_path / "Llama-3.2-1B" / "config.json").write_text('{"model_type": "llama", "x": 1}')
    data, source = presets.hf_config(tmp_path / "Llama-3.2-1B")
    assert data == {"model_type": "llama", "x": 1} and source.endswith("config.json")
    with pytest.raises(FileNotFoundError, match=r"no config.json .*\(llama-3.1-8b"):
        presets.hf_config(tmp_path / "my-model")
