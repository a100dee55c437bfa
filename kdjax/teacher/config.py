"""`PrecomputeConfig`: what `kdjax precompute` runs, as a frozen, self-validating dataclass.

YAML (`kdjax precompute --config precompute.yaml [key=value ...]`):

    teacher: /ckpt/qwen2.5-7b        # transformers/kdjax checkpoint directory
    tokens: /data/tokens/train       # token store (kdjax pack)
    out: /data/teacher/train-topk    # teacher store to write (resumable)
    mode: topk                       # sampled | topk | dense
    k: 32                            # topk: ids kept per position
    num_samples: 64                  # sampled: N draws per position
    num_slots: 32                    # sampled: U distinct (id, count) slots kept
    temperature: 1.0
    batch_size: 32                   # global rows per teacher forward
    shard_rows: 256                  # rows per shard file (the commit/resume unit)
    dtype: bfloat16                  # teacher compute dtype (the default); float32 = full
                                     # precision

The teacher runs in bfloat16 by default, weights included (it has no optimizer state and
is only read): weights and activations are bf16, matmuls accumulate in f32 (XLA's bf16
dots on CPU, GPU and TPU), and the top-k and sampled signals come from f32 logits (the
vocabulary projection accumulates into f32; log-softmax, top-k and draws run in f32).
Dense stores hold the decoder's logits, which are in the compute dtype: use
`dtype=float32` for a dense store. The manifest records the compute dtype
(`teacher_dtype`), and a store is resumed only with the same one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from kdjax.teacher.signal import MODES


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    """Settings of one precompute run.

    Attributes:
      teacher: checkpoint directory (`kdjax.models.from_pretrained`).
      tokens: token-store directory (`kdjax.data.open_token_store`).
      out: teacher-store directory to write; a rerun resumes it.
      mode: "sampled" | "topk" | "dense".
      k: top-k ids per position (topk).
      num_samples: N, draws per position (sampled).
      num_slots: U, distinct ids kept per position (sampled); more distinct → the U
        largest counts are kept and the overflow is counted in the manifest.
      temperature: T of p = softmax(logits / T) for topk and sampled (dense stores raw
        logits).
      seed: sampling seed; draws are a pure function of (seed, row).
      batch_size: global rows per teacher forward (divisible by the data-parallel size
        and by the number of processes).
      shard_rows: rows per shard (the unit a process writes and a rerun redoes).
      chunk_rows: rows per crc32c chunk (the random-read unit of the loader).
      hidden_layers: residual-stream indices whose hidden states are also stored.
      hidden_dtype, dense_dtype, logprob_dtype: stored dtypes.
      dtype: teacher compute dtype, "bfloat16" (default), "float32" or "float16"; the
        logits the signal is computed from are f32 whatever it is.
      param_dtype: dtype the teacher's weights are loaded in; None (default) = `dtype`.
        Both apply when `teacher` is loaded from its checkpoint; a model passed to
        `precompute(model=...)` runs as built.
      mesh: (data, fsdp, tensor) sizes; one may be -1 (all remaining devices).
      teacher_fingerprint: overrides hashing the checkpoint (e.g. a model hub revision).
      overwrite: replace an existing store written with different settings.
      progress: show a progress bar.
    """

    teacher: str = ""
    tokens: str = ""
    out: str = ""
    mode: str = "topk"
    k: int = 32
    num_samples: int = 64
    num_slots: int = 32
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    shard_rows: int = 64
    chunk_rows: int = 1
    hidden_layers: tuple[int, ...] = ()
    hidden_dtype: str = "bfloat16"
    dense_dtype: str = "float32"
    logprob_dtype: str = "float32"
    dtype: str = "bfloat16"
    param_dtype: str | None = None
    mesh: tuple[int, int, int] = (-1, 1, 1)
    teacher_fingerprint: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(int(h) for h in self.hidden_layers))
        object.__setattr__(self, "mesh", tuple(int(m) for m in self.mesh))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("k", "num_samples", "num_slots", "batch_size", "shard_rows",
                     "chunk_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of "
                             f"chunk_rows ({self.chunk_rows})")
        if len(self.mesh) != 3:
            raise ValueError(f"mesh must be (data, fsdp, tensor), got {self.mesh}")
        for name in ("hidden_dtype", "dense_dtype", "logprob_dtype"):
            _check_float_dtype(name, getattr(self, name))
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None or name == "dtype":
                _check_teacher_dtype(name, value)

    @classmethod
    def from_dict(cls, values: Mapping) -> PrecomputeConfig:
        """Builds a config from a mapping; an unknown key is an error naming the nearest."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown precompute setting {key!r}{hint} "
                                 f"(valid: {', '.join(fields)})")
        return cls(**dict(values))

    @classmethod
    def load(cls, path: str | None = None, overrides: Sequence[str] = ()) -> PrecomputeConfig:
        """Reads a YAML file (optional) and applies `key=value` overrides (YAML values)."""
        import yaml

        values = {}
        if path:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a YAML mapping of precompute settings, "
                                 f"got {type(values).__name__}")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value (e.g. mode=topk)")
            values[key.strip()] = yaml.safe_load(raw)
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def teacher_param_dtype(self) -> str:
        """The dtype the teacher's weights are loaded in (`param_dtype`, else `dtype`)."""
        return self.param_dtype or self.dtype


TEACHER_DTYPES = ("bfloat16", "float32", "float16")


def _check_teacher_dtype(name: str, value) -> None:
    if value not in TEACHER_DTYPES:
        raise ValueError(f"{name} must be one of {TEACHER_DTYPES} (the teacher's compute "
                         f"dtype; bfloat16 is the default, float32 for full precision), "
                         f"got {value!r}")


def _check_float_dtype(name: str, value: str) -> None:
    try:
        dt = np.dtype(value)  # ml_dtypes (imported above) registers "bfloat16"
    except TypeError:
        dt = None
    if dt is None or (dt.kind != "f" and dt.name != "bfloat16"):
        raise ValueError(f"{name} must be a float dtype name (float32, bfloat16, float16), "
                         f"got {value!r}")
