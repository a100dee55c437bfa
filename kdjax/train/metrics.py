"""Training metrics: token-weighted windows, JSONL / TensorBoard sinks, a progress bar,
FLOP accounting (MFU) and a plot of the curves at the end.

Metrics travel as `kdjax.losses.reduce.Weighted(sum, count)` pairs (MaxText-style), so
a logging window over many steps, micro-batches and hosts is one division at the end:
mean = Σ sums / Σ counts. Plain scalars (learning rate, grad norm) are averaged per
step. The accumulator keeps device arrays and syncs with the host only when a window is
read, so logging does not stall the step pipeline.

    logger = RunLogger(run_dir, total_steps=1000, start_step=resumed_step)
    for step in ...:
        state, metrics = train_step(state, batch)
        logger.log_step(step + 1, metrics, tokens=batch_tokens)  # flushes every `every`
    summary = logger.close()  # writes curves.png, returns where everything went
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from kdjax.losses.reduce import Weighted

__all__ = ["FlopCounter", "JsonlWriter", "MetricWindow", "ProgressBar", "RunLogger",
           "TensorBoardWriter", "forward_flops_per_token", "peak_flops_per_device",
           "plot_curves", "read_jsonl", "training_flops_per_token"]


class MetricWindow:
    """Sums `Weighted` metrics (and per-step scalars) until `read()` returns the means."""

    def __init__(self):
        self._weighted: dict[str, Weighted] = {}
        self._scalars: dict[str, tuple[Any, int]] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Adds one step's metrics: `Weighted` values are summed as (sum, count); anything
        else is a scalar averaged over the steps of the window."""
        for name, value in metrics.items():
            if isinstance(value, Weighted):
                old = self._weighted.get(name)
                self._weighted[name] = value if old is None else old + value
            else:
                total, n = self._scalars.get(name, (0.0, 0))
                self._scalars[name] = (total + value, n + 1)

    def __bool__(self) -> bool:
        return bool(self._weighted or self._scalars)

    def read(self, reset: bool = True) -> dict[str, float]:
        """Token-weighted means (and step means of scalars) as Python floats; one
        device→host transfer. Metrics whose window count is 0 are left out."""
        weighted, scalars = jax.device_get((self._weighted, self._scalars))
        out = {}
        for name, w in weighted.items():
            if float(w.count) > 0:
                out[name] = float(w.sum) / float(w.count)
        for name, (total, n) in scalars.items():
            out[name] = float(total) / n
        if reset:
            self._weighted, self._scalars = {}, {}
        return out


# ----------------------------------------------------------------------- sinks


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file (a torn last line from a crash is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class JsonlWriter:
    """Appends one JSON object per line, flushed per write.

    Resumable: opened with `resume_step`, it first drops records whose `step` is past
    the checkpoint being resumed (they will be logged again) and any torn line, so the
    file never holds a step twice.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if jax.process_index() == 0 and os.path.exists(self.path):
            keep = [r for r in read_jsonl(self.path)
                    if resume_step is not None and r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.path)
        self._file = open(self.path, "a") if jax.process_index() == 0 else None  # noqa: SIM115

    def write(self, step: int, metrics: Mapping[str, float], **extra: Any) -> None:
        if self._file is None:
            return
        record = {"step": int(step), **extra, **{k: _json_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _json_float(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no nan/inf


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch
    only to accept torch tensors (we log floats), and that import costs seconds."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalars to TensorBoard event files (tensorboardX). On resume, events after
    `resume_step` are purged by TensorBoard (`purge_step`), so curves do not fold back."""

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self._writer = None
        if jax.process_index() == 0:
            purge = None if resume_step is None else resume_step + 1
            self._writer = _summary_writer_class()(self.logdir, purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(prefix + name, float(value), global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ProgressBar:
    """tqdm bar over steps with tokens/s and loss in the postfix; tqdm gives the ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 desc: str = "train"):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                         dynamic_ncols=True,
                         disable=not enabled or jax.process_index() != 0)

    def update(self, step: int, *, tokens_per_s: float | None = None,
               loss: float | None = None, **fields: float) -> None:
        """Moves the bar to `step` and shows the latest throughput and loss."""
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{tokens_per_s:,.0f}"
        post.update({k: f"{v:.4g}" for k, v in fields.items()})
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        self._bar.close()


# ----------------------------------------------------------------------- FLOPs / MFU

def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Vendor bf16 dense peak of `device` (default: the first) from the chip table
    `kdjax.compile.chips`, or None when unknown (CPUs: measure a matmul ceiling instead,
    as `benchmarks/` does)."""
    from kdjax.compile.chips import chip_for

    chip = chip_for((device or jax.devices()[0]).device_kind)
    return None if chip is None else chip.peak_flops


def forward_flops_per_token(num_params: int, *, num_layers: int = 0, seq_len: int = 0,
                            attention_dim: int = 0) -> float:
    """Forward FLOPs per token: 2·N for the weights (N excludes the embedding lookup,
    includes the lm_head) + 4·layers·L·d_attn for QKᵀ and AV (full, not causal-halved),
    as in PaLM appendix B (Chowdhery et al. 2022)."""
    return 2.0 * num_params + 4.0 * num_layers * seq_len * attention_dim


class FlopCounter:
    """Model FLOPs of one training token: 3× the student forward (forward + backward)
    plus 1× the teacher forward for an online teacher (offline: the teacher ran before).

    Args:
      student_forward: forward FLOPs per token of the student (`forward_flops_per_token`).
      teacher_forward: forward FLOPs per token of an online teacher, else 0.
    """

    def __init__(self, student_forward: float, teacher_forward: float = 0.0):
        self.per_token = 3.0 * student_forward + teacher_forward

    @classmethod
    def from_models(cls, student, seq_len: int, teacher=None) -> FlopCounter:
        """From `DecoderConfig`s: 6·P + 12·layers·L·d per student token (+ the online
        teacher's 2·P_t + 4·layers_t·L·d_t), see `kdjax.compile.flops`."""
        from kdjax.compile.flops import forward_flops_per_token as fwd

        return cls(fwd(student, seq_len), 0.0 if teacher is None else fwd(teacher, seq_len))

    def flops_per_s(self, tokens_per_s: float) -> float:
        return self.per_token * tokens_per_s

    def mfu(self, tokens_per_s: float, num_devices: int, peak: float | None) -> float | None:
        """Model FLOPs utilization in [0, 1] against `num_devices × peak`, or None."""
        if not peak:
            return None
        return self.flops_per_s(tokens_per_s) / (num_devices * peak)


def training_flops_per_token(student_params: int, teacher_params: int = 0) -> float:
    """The 6·N_s + 2·N_t rule of thumb (weights only): training the student costs
    forward + backward = 6 FLOPs per parameter and token; an online teacher adds 2."""
    return 6.0 * student_params + 2.0 * teacher_params


# ----------------------------------------------------------------------- plot


def plot_curves(jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                keys: list[str] | None = None) -> str | None:
    """One panel per metric (train and eval series together) from a metrics JSONL file;
    returns the PNG path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list, list]]] = {}
    for record in read_jsonl(jsonl_path):
        split = record.get("split", "train")
        for name, value in record.items():
            if name in ("step", "split") or not isinstance(value, int | float):
                continue
            if keys is not None and name not in keys:
                continue
            xs, ys = series.setdefault(name, {}).setdefault(split, ([], []))
            xs.append(record["step"])
            ys.append(value)
    if not series:
        return None
    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split, (xs, ys) in sorted(series[name].items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series[name]) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return os.fspath(out_png)


# ----------------------------------------------------------------------- run logger


class RunLogger:
    """Everything the loop logs: windows of `every` steps to JSONL / TensorBoard, the
    progress bar, eval records, and at `close()` the curves PNG and a summary.

    Args:
      run_dir: outputs go to `metrics.jsonl`, `tensorboard/`, `curves.png` inside it.
      logging: a `kdjax.train.config.LoggingConfig` (every, jsonl, tensorboard, plot,
        progress).
      total_steps: the run's last step; start_step: the resumed step (0 for fresh).
      flops: optional FlopCounter to log achieved FLOP/s and, where the chip's peak is
        known (kdjax.compile.chips), MFU. tokens/s per device is always logged.
    """

    def __init__(self, run_dir: str | os.PathLike, logging, *, total_steps: int,
                 start_step: int = 0, flops: FlopCounter | None = None):
        self.run_dir, self.cfg, self.flops = os.fspath(run_dir), logging, flops
        self.total_steps = total_steps
        resume = start_step if start_step > 0 else None
        self.jsonl_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.jsonl = JsonlWriter(self.jsonl_path, resume) if logging.jsonl else None
        self.tb_dir = os.path.join(self.run_dir, "tensorboard")
        self.tb = TensorBoardWriter(self.tb_dir, resume) if logging.tensorboard else None
        self.bar = ProgressBar(total_steps, start_step, enabled=logging.progress)
        self.window = MetricWindow()
        self.last: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._tokens, self._t0, self._step = 0, time.perf_counter(), start_step
        self._paused = 0.0  # seconds of eval / checkpointing inside the current window
        self._peak, self._devices = peak_flops_per_device(), jax.device_count()

    @contextlib.contextmanager
    def paused(self):
        """Work inside this block (eval, checkpoint saves) is left out of the step
        throughput (`tokens_per_s`); `wall_tokens_per_s` still includes it."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t

    def log_step(self, step: int, metrics: Mapping[str, Any], *, tokens: int) -> None:
        """Adds one step's metrics (`Weighted` or scalars, device arrays are fine);
        writes a window every `logging.every` steps and at the last step."""
        self.window.add(metrics)
        self._tokens += int(tokens)
        self._step = step
        if step % self.cfg.every == 0 or step >= self.total_steps:
            self.flush(step)
        else:
            self.bar.update(step)

    def flush(self, step: int) -> None:
        if not self.window:
            return
        values = self.window.read()
        wall = max(time.perf_counter() - self._t0, 1e-9)
        values["tokens_per_s"] = self._tokens / max(wall - self._paused, 1e-9)
        values["wall_tokens_per_s"] = self._tokens / wall
        values["tokens_per_s_per_device"] = values["tokens_per_s"] / self._devices
        if self.flops is not None:
            values["flops_per_s"] = self.flops.flops_per_s(values["tokens_per_s"])
            mfu = self.flops.mfu(values["tokens_per_s"], self._devices, self._peak)
            if mfu is not None:
                values["mfu"] = mfu
        self._write(step, values, "train")
        self.last = values
        self.bar.update(step, tokens_per_s=values["tokens_per_s"], loss=values.get("loss"))
        self._tokens, self._t0, self._paused = 0, time.perf_counter(), 0.0

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes an eval record now (`Weighted` values are reduced to means)."""
        window = MetricWindow()
        window.add(metrics)
        values = window.read()
        self._write(step, values, "eval")
        self.last_eval = values
        return values

    def _write(self, step: int, values: dict[str, float], split: str) -> None:
        if self.jsonl is not None:
            self.jsonl.write(step, values, split=split)
        if self.tb is not None:
            self.tb.write(step, values, prefix=f"{split}/")

    def close(self) -> dict[str, Any]:
        """Flushes, closes the sinks, plots, and returns where everything was written."""
        self.flush(self._step)
        self.bar.close()
        for sink in (self.jsonl, self.tb):
            if sink is not None:
                sink.close()
        summary: dict[str, Any] = {"train": self.last, "eval": self.last_eval}
        if self.flops is not None and not self._peak:
            summary["mfu"] = (f"not logged: peak FLOP/s of {jax.devices()[0].device_kind!r} "
                              "unknown (kdjax.compile.chips lists TPU v4/v5e/v5p/v6e, "
                              "A100/H100/H200)")
        if self.jsonl is not None:
            summary["metrics_jsonl"] = self.jsonl_path
        if self.tb is not None:
            summary["tensorboard"] = self.tb_dir
        if self.cfg.plot and self.jsonl is not None and jax.process_index() == 0:
            png = plot_curves(self.jsonl_path, os.path.join(self.run_dir, "curves.png"))
            if png:
                summary["curves_png"] = png
        return summary
