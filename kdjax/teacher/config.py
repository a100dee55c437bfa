"""`PrecomputeConfig`: what `kdjax precompute` runs, as a frozen, self-validating dataclass.

YAML (`kdjax precompute --config precompute.yaml [key=value ...]`):

    teacher: /ckpt/qwen2.5-7b        # transformers/kdjax checkpoint directory
    tokens: /data/tokens/train       # token store (kdjax pack)
    out: /data/teacher/train-topk    # teacher store to write (resumable)
    mode: topk                       # sampled | topk | dense
    k: 32                            # topk: ids kept per position
    num_samples: 64                  # sampled: N draws per position
    num_slots: null                  # sampled: U distinct (id, count) slots; null = N
    temperature: 1.0
    batch_size: 32                   # global rows per teacher forward
    shard_rows: 256                  # rows per shard file (the commit/resume unit)
    dtype: bfloat16                  # teacher compute dtype (the default); float32 = full
                                     # precision

Every setting, its default and its meaning: `kdjax precompute --help`; an example file:
configs/precompute/quickstart_sampled.yaml.

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
from collections.abc import Mapping, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from kdjax import schema
from kdjax.catalog import STORE_MODES
from kdjax.models.config import DTYPES
from kdjax.schema import ConfigError, check, check_choice


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
    """Settings of one precompute run (each field's meaning is the string under it; `kdjax
    precompute --help` lists them with their defaults)."""

    teacher: str = ""
    """Required: the teacher checkpoint directory (a Hugging Face model: config.json +
    *.safetensors). Its tokenizer, when the directory holds one, must be the token store's."""
    tokens: str = ""
    """Required: the token store directory to run the teacher over (`kdjax pack` writes one)."""
    out: str = ""
    """Required: the teacher store directory to write; a rerun resumes it (only missing shards)."""
    mode: str = "topk"
    """What is stored per position: topk (the k most likely ids and their log-probs),
    sampled (num_samples draws, as (id, count) slots) or dense (every logit; debug-size
    vocabularies only)."""
    k: int = 32
    """topk: ids kept per position."""
    num_samples: int = 64
    """sampled: N, draws per position from p = softmax(logits / T)."""
    num_slots: int | None = None
    """sampled: U, distinct (id, count) slots kept per position; null (the default) = N,
    so no draw is ever dropped and t̂ = counts/N is unbiased. With U < N, a position that
    draws more than U distinct ids keeps the U largest counts and drops the rest (biased;
    `kdjax precompute` warns and the manifest counts it)."""
    temperature: float = 1.0
    """T of p = softmax(logits / T) for topk and sampled (dense stores raw logits)."""
    seed: int = 0
    """Sampling seed; the draws are a pure function of (seed, row)."""
    batch_size: int = 8
    """Global rows per teacher forward (divisible by the data-parallel size and by the
    number of processes)."""
    shard_rows: int = 64
    """Rows per shard file: the unit a process writes and a rerun redoes."""
    chunk_rows: int = 1
    """Rows per crc32c chunk (the random-read unit of the loader); divides shard_rows."""
    hidden_layers: tuple[int, ...] = ()
    """Residual-stream indices whose teacher hidden states are stored too, e.g. [-1]."""
    hidden_dtype: str = "bfloat16"
    """Stored dtype of the hidden states."""
    dense_dtype: str = "float32"
    """Stored dtype of dense logits."""
    logprob_dtype: str = "float32"
    """Stored dtype of top-k log-probs."""
    dtype: str = "bfloat16"
    """Teacher compute dtype: bfloat16, float32 or float16; the signal is computed from f32
    logits whatever it is (use float32 for a dense store)."""
    param_dtype: str | None = None
    """Dtype the teacher's weights are loaded in; null = `dtype`."""
    mesh: tuple[int, int, int] = (-1, 1, 1)
    """(data, fsdp, tensor) device-mesh sizes; one may be -1 (all remaining devices)."""
    tokenizer: str | None = None
    """Directory of the teacher's tokenizer, which the token store must have been packed
    with; null = the tokenizer files in the teacher directory (when it has none, the check
    is skipped with a note)."""
    teacher_fingerprint: str | None = None
    """Identifies the teacher's weights instead of hashing the checkpoint (e.g. a hub
    revision); required for a teacher passed as a model object."""
    overwrite: bool = False
    """Replace an existing store written with different settings (also `--overwrite`)."""
    progress: bool = True
    """Show a progress bar and the end-of-run summary."""

    # names users try for the settings above (the unknown-key error suggests these)
    ALIASES = {"topk": "k", "top_k": "k", "samples": "num_samples", "n": "num_samples",
               "n_samples": "num_samples", "slots": "num_slots", "u": "num_slots",
               "bs": "batch_size", "teacher_dir": "teacher", "model": "teacher",
               "data": "tokens", "token_store": "tokens", "output": "out", "out_dir": "out",
               "output_dir": "out", "store": "out", "temp": "temperature"}
    OVERRIDE_FORM = "key=value (e.g. mode=topk)"

    def __post_init__(self):
        object.__setattr__(self, "hidden_layers", tuple(int(h) for h in self.hidden_layers))
        object.__setattr__(self, "mesh", tuple(int(m) for m in self.mesh))
        if self.num_slots is None:  # U = N: every draw has a slot (unbiased)
            object.__setattr__(self, "num_slots", self.num_samples)
        check_choice(self.mode, STORE_MODES, "mode")
        for name in ("k", "num_samples", "num_slots", "batch_size", "shard_rows",
                     "chunk_rows"):
            value = getattr(self, name)
            check(int(value) >= 1, name, f"must be >= 1, got {value}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.shard_rows % self.chunk_rows == 0, "shard_rows",
              f"{self.shard_rows} must be a multiple of chunk_rows ({self.chunk_rows})")
        check(len(self.mesh) == 3, "mesh", f"must be [data, fsdp, tensor], got {self.mesh}")
        for name in ("hidden_dtype", "dense_dtype", "logprob_dtype"):
            _check_float_dtype(name, getattr(self, name))
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None or name == "dtype":
                _check_teacher_dtype(name, value)

    @classmethod
    def from_dict(cls, values: Mapping) -> PrecomputeConfig:
        """Builds a config from a mapping; an unknown key is an error naming the nearest,
        a value of the wrong type one naming the key."""
        return schema.build(cls, dict(values))

    @classmethod
    def load(cls, path: str | None = None, overrides: Sequence[str] = ()) -> PrecomputeConfig:
        """Reads a YAML file (optional) and applies `key=value` overrides (YAML values), as
        every command reads its settings (`kdjax.schema.load`)."""
        return schema.load(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def teacher_param_dtype(self) -> str:
        """The dtype the teacher's weights are loaded in (`param_dtype`, else `dtype`)."""
        return self.param_dtype or self.dtype


def _check_teacher_dtype(name: str, value) -> None:
    if value not in DTYPES:
        raise ConfigError(f"{name} must be one of {DTYPES} (the teacher's compute "
                         f"dtype; bfloat16 is the default, float32 for full precision), "
                         f"got {value!r}")


def _check_float_dtype(name: str, value: str) -> None:
    try:
        dt = np.dtype(value)  # ml_dtypes (imported above) registers "bfloat16"
    except TypeError:
        dt = None
    if dt is None or (dt.kind != "f" and dt.name != "bfloat16"):
        raise ConfigError(f"{name} must be a float dtype name (float32, bfloat16, float16), "
                         f"got {value!r}")
