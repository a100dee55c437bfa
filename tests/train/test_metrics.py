"""Metrics: token-weighted windows, resumable JSONL, TensorBoard events, progress bar,
FLOP accounting and the curves plot."""

import json
import pathlib
import struct
import types

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses.reduce import Weighted, masked_sum_count
from kdjax.train import metrics as M
from kdjax.train.config import LoggingConfig


def test_window_is_token_weighted_across_steps_and_micro_batches(rng):
    window = M.MetricWindow()
    values, masks = [], []
    for _ in range(3):  # steps
        step_total = Weighted.zero()
        for _ in range(2):  # micro-batches of different token counts
            v = rng.standard_normal((2, int(rng.integers(3, 9))))
            m = rng.random(v.shape) < 0.6
            values.append(v[m])
            masks.append(m)
            step_total = step_total + masked_sum_count(jnp.asarray(v, jnp.float32),
                                                       jnp.asarray(m))
        window.add({"loss": step_total, "lr": jnp.asarray(rng.random(), jnp.float32),
                    "empty": Weighted(jnp.zeros(()), jnp.zeros(()))})
    lrs = [float(window._scalars["lr"][0])]  # the running scalar total, for the check below
    out = window.read()
    expected = np.concatenate(values).astype(np.float64).mean()
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(out["lr"], lrs[0] / 3, rtol=1e-6)
    assert "empty" not in out  # a window without tokens reports nothing, not 0 or NaN
    assert not window and window.read() == {}


def test_jsonl_resume_drops_steps_past_the_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = M.JsonlWriter(path)
    for step in range(1, 11):
        writer.write(step, {"loss": 1.0 / step, "bad": float("nan")}, split="train")
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 11, "loss": 0.0')  # torn by a crash mid-write
    assert [r["step"] for r in M.read_jsonl(path)] == list(range(1, 11))
    assert M.read_jsonl(path)[0]["bad"] == "nan"
    writer = M.JsonlWriter(path, resume_step=6)
    writer.write(7, {"loss": 0.5})
    writer.close()
    steps = [r["step"] for r in M.read_jsonl(path)]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert len(path.read_text().splitlines()) == 7
    M.JsonlWriter(path).close()  # a fresh (not resumed) run starts an empty file
    assert M.read_jsonl(path) == []


def _tfrecord_scalars(logdir):
    """(tag, step, value) from TensorBoard event files, parsed from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events(tmp_path):
    writer = M.TensorBoardWriter(tmp_path / "tb")
    for step in (1, 2, 3):
        writer.write(step, {"loss": step * 0.5}, prefix="train/")
    writer.close()
    scalars = _tfrecord_scalars(tmp_path / "tb")
    assert scalars == [("train/loss", s, pytest.approx(s * 0.5)) for s in (1, 2, 3)]


def test_flop_accounting():
    n_s, n_t = 1_000_000, 7_000_000
    counter = M.FlopCounter(M.forward_flops_per_token(n_s), M.forward_flops_per_token(n_t))
    assert counter.per_token == M.training_flops_per_token(n_s, n_t) == 6 * n_s + 2 * n_t
    assert M.FlopCounter(M.forward_flops_per_token(n_s)).per_token == 6 * n_s  # offline
    # attention term: QKᵀ and AV, 2 FLOPs per multiply-add, per layer and key
    assert M.forward_flops_per_token(0, num_layers=2, seq_len=8, attention_dim=4) == 4 * 2 * 8 * 4
    tps = 1234.0
    assert counter.mfu(tps, 4, 1e12) == pytest.approx(counter.per_token * tps / 4e12)
    assert counter.mfu(tps, 4, None) is None
    tpu = types.SimpleNamespace(device_kind="TPU v5p")
    lite = types.SimpleNamespace(device_kind="TPU v5 lite")
    assert M.peak_flops_per_device(tpu) == 459e12 and M.peak_flops_per_device(lite) == 197e12
    assert M.peak_flops_per_device(types.SimpleNamespace(device_kind="cpu")) is None


def test_plot_curves(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = M.JsonlWriter(path)
    for step in range(1, 6):
        writer.write(step, {"loss": 2.0 / step, "tokens_per_s": 100.0 + step}, split="train")
    writer.write(5, {"loss": 0.7}, split="eval")
    writer.close()
    png = M.plot_curves(path, tmp_path / "curves.png")
    assert png and pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert M.plot_curves(tmp_path / "none.jsonl", tmp_path / "x.png") is None


def test_run_logger_end_to_end_and_resume(tmp_path, capsys):
    cfg = LoggingConfig(every=2)
    flops = M.FlopCounter(2.0e6)
    logger = M.RunLogger(tmp_path, cfg, total_steps=5, flops=flops)
    for step in range(1, 6):
        loss = Weighted(jnp.asarray(3.0 * step), jnp.asarray(3.0))
        logger.log_step(step, {"loss": loss}, tokens=64)
        if step == 4:
            logger.log_eval(step, {"ce": Weighted(jnp.asarray(5.0), jnp.asarray(2.0))})
    summary = logger.close()
    records = M.read_jsonl(tmp_path / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert train == [(2, 1.5), (4, 3.5), (5, 5.0)]  # window means of steps (1,2), (3,4), (5)
    assert [(r["step"], r["ce"]) for r in records if r["split"] == "eval"] == [(4, 2.5)]
    assert all(r["flops_per_s"] == pytest.approx(6e6 * r["tokens_per_s"])
               for r in records if r["split"] == "train")
    assert summary["eval"] == {"ce": 2.5} and summary["train"]["loss"] == 5.0
    assert pathlib.Path(summary["curves_png"]).read_bytes()[:4] == b"\x89PNG"
    assert {t for t, _, _ in _tfrecord_scalars(tmp_path / "tensorboard")} >= {
        "train/loss", "eval/ce", "train/tokens_per_s"}
    err = capsys.readouterr().err
    assert "5/5" in err and "loss=5.0000" in err and "tok/s=" in err
    # resume from the checkpoint at step 4: step 5 is logged again, never twice
    logger = M.RunLogger(tmp_path, cfg, total_steps=6, start_step=4)
    logger.log_step(5, {"loss": Weighted(jnp.asarray(1.0), jnp.asarray(1.0))}, tokens=64)
    logger.close()
    steps = [r["step"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [2, 4, 4, 5] and json.loads(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 1.0


def test_logger_reports_per_device_throughput_and_mfu_only_with_a_known_peak(tmp_path):
    import jax

    cfg = LoggingConfig(every=1, tensorboard=False, plot=False, progress=False)
    logger = M.RunLogger(tmp_path, cfg, total_steps=1, flops=M.FlopCounter(1e6))
    logger.log_step(1, {"loss": Weighted(jnp.asarray(1.0), jnp.asarray(1.0))}, tokens=64)
    summary = logger.close()
    record = M.read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert record["tokens_per_s_per_device"] == pytest.approx(
        record["tokens_per_s"] / jax.device_count())
    assert "mfu" not in record and "unknown" in summary["mfu"]  # CPU: no peak FLOP/s
    logger = M.RunLogger(tmp_path / "tpu", cfg, total_steps=1, flops=M.FlopCounter(1e6))
    logger._peak = 459e12  # as on a TPU v5p
    logger.log_step(1, {"loss": Weighted(jnp.asarray(1.0), jnp.asarray(1.0))}, tokens=64)
    assert "mfu" not in logger.close()
    record = M.read_jsonl(tmp_path / "tpu" / "metrics.jsonl")[-1]
    assert record["mfu"] == pytest.approx(
        3e6 * record["tokens_per_s"] / (jax.device_count() * 459e12))
