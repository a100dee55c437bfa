"""`GenerateConfig`: what `kdjax generate` runs, validated without JAX or disk reads.

YAML (`kdjax generate --config generate.yaml [key=value ...]`):

    model: /ckpt/teacher            # HF directory, .gguf file or a kdjax run directory
    prompts: /data/prompts/train    # example store (`kdjax pack --layout examples`)
    out: /data/generated/train      # generated dataset to write (resumable)
    n: 4                            # completions per prompt
    max_new_tokens: 256
    temperature: 0.7                # 0 = greedy
    top_p: 0.95
    stop: ["\\n\\nUser:"]           # stop strings (the stop token ids are `stop_token_ids`)
    filter: {finished_only: true, answer_regex: "answer is (\\d+)"}

Every setting, its default and its meaning: `kdjax generate --help`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from kdjax import schema
from kdjax.generate.curate import FilterConfig
from kdjax.models.config import DTYPES
from kdjax.schema import ConfigError, check, check_choice

MODES = ("label", "expand")


@dataclasses.dataclass(frozen=True)
class ExpandConfig:
    """Self-Instruct expansion (`mode: expand`): grow instructions from a seed file, then
    answer them."""

    seed_file: str | None = None
    """Seed instructions: a .txt file (one per line) or .jsonl with an `instruction` field."""
    num_instructions: int = 100
    """New instructions to grow (the seeds are not answered unless `answer_seeds`)."""
    few_shot: int = 6
    """Instructions from the pool shown in each expansion prompt."""
    max_rounds: int = 50
    """Expansion rounds at most (each proposes `batch_size` instructions)."""
    max_overlap: float = 0.7
    """Drop a proposed instruction whose word-bigram Jaccard similarity to any instruction
    of the pool is at least this (Self-Instruct's near-duplicate rule, on n-grams)."""
    min_words: int = 3
    """Shortest instruction kept, in words."""
    max_words: int = 60
    """Longest instruction kept, in words."""
    instruction_tokens: int = 48
    """max_new_tokens of an expansion proposal."""
    temperature: float = 1.0
    """Sampling temperature of the expansion proposals (the answers use `temperature`)."""
    answer_seeds: bool = False
    """Answer the seed instructions too."""

    def __post_init__(self):
        for name in ("num_instructions", "few_shot", "max_rounds", "min_words",
                     "instruction_tokens"):
            value = getattr(self, name)
            check(value >= 1, f"expand.{name}", f"must be >= 1, got {value}")
        check(self.max_words >= self.min_words, "expand.max_words",
              f"must be >= min_words={self.min_words}, got {self.max_words}")
        check(0.0 < self.max_overlap <= 1.0, "expand.max_overlap",
              f"must be in (0, 1], got {self.max_overlap}")
        check(self.temperature > 0, "expand.temperature",
              f"must be > 0 (proposals must differ), got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """One `kdjax generate` run."""

    model: str = ""
    """Required: the generating model: a Hugging Face directory, a .gguf file or a kdjax run
    directory (its latest checkpoint)."""
    out: str = ""
    """Required: the generated dataset to write; a rerun resumes it (only missing shards)."""
    prompts: str | None = None
    """The example store of prompts (`kdjax pack --layout examples`); required in label
    mode."""
    mode: str = "label"
    """label (complete each prompt) | expand (grow instructions from `expand.seed_file`,
    then answer them)."""
    tokenizer: str | None = None
    """Tokenizer directory; null = the model's (its directory, the .gguf file, or the run's
    data.tokenizer). It must be the prompts' tokenizer."""
    n: int = 1
    """Completions per prompt (sample_index 0..n-1)."""
    max_new_tokens: int = 256
    """Tokens generated per completion at most (finish_reason length when reached)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy (then n > 1 repeats the same completion)."""
    top_k: int | None = None
    """Sample among the k most likely tokens; null = off."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with mass >= top_p; null = off."""
    stop: list = dataclasses.field(default_factory=list)
    """Stop strings: the completion ends before the first one (finish_reason stop)."""
    stop_token_ids: list = dataclasses.field(default_factory=list)
    """Token ids that end a completion besides the model's EOS (kept in the completion)."""
    seed: int = 0
    """Sampling seed: sample (example, i) draws from a key of (seed, example_id, i), so the
    output does not depend on batch size, devices or hosts."""
    batch_size: int = 8
    """Sequences per generate call (over all devices)."""
    shard_examples: int = 64
    """Examples per parquet shard: the unit a rerun redoes."""
    buckets: list | None = None
    """Prompt-length buckets (each compiles once); null = powers of two up to the store's
    prompt width."""
    dtype: str = "bfloat16"
    """Compute dtype of the model."""
    param_dtype: str | None = None
    """Dtype the weights are loaded in; null = `dtype`."""
    mesh: list = dataclasses.field(default_factory=lambda: [-1, 1, 1])
    """(data, fsdp, tensor) device-mesh sizes; one may be -1 (all remaining devices)."""
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    """Curation of the completions; the curated dataset goes to `<out>/curated`."""
    expand: ExpandConfig = dataclasses.field(default_factory=ExpandConfig)
    """Instruction expansion (mode expand)."""
    overwrite: bool = False
    """Replace an existing dataset written with other settings (also `--overwrite`)."""
    progress: bool = True
    """Show a progress bar (prompts, tokens/s, ETA) and the end-of-run summary."""

    ALIASES = {"num_samples": "n", "samples": "n", "max_tokens": "max_new_tokens",
               "temp": "temperature", "output": "out", "out_dir": "out", "data": "prompts",
               "dataset": "prompts", "teacher": "model", "stop_strings": "stop",
               "bs": "batch_size", "eos_token_id": "stop_token_ids"}
    OVERRIDE_FORM = "key=value (e.g. n=4 or filter.answer_regex='answer: (\\d+)')"

    def __post_init__(self):
        check(bool(self.model), "model", "required: a Hugging Face directory, .gguf file or "
              "kdjax run directory (model=...)")
        check(bool(self.out), "out", "required: the directory to write (out=...)")
        check_choice(self.mode, MODES, "mode")
        if self.mode == "label":
            check(self.prompts is not None, "prompts", "label mode needs an example store of "
                  "prompts (`kdjax pack --layout examples`); or set mode=expand")
        else:
            check(self.expand.seed_file is not None, "expand.seed_file",
                  "expand mode needs a seed file of instructions (expand.seed_file=...)")
        for name in ("n", "max_new_tokens", "batch_size", "shard_examples"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be >= 1, got {value}")
        check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got "
              f"{self.temperature}")
        check(self.top_k is None or self.top_k >= 1, "top_k", f"must be >= 1 or null, got "
              f"{self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1, "top_p",
              f"must be in (0, 1] or null, got {self.top_p}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              f"must be a list of non-empty strings, got {self.stop!r}")
        check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                  for t in self.stop_token_ids), "stop_token_ids",
              f"must be a list of token ids (ints >= 0), got {self.stop_token_ids!r}")
        if self.buckets is not None:
            b = self.buckets
            check(bool(b) and all(isinstance(x, int) and x >= 1 for x in b)
                  and list(b) == sorted(set(b)), "buckets",
                  f"must be a non-empty increasing list of prompt lengths, got {b!r}")
        check_choice(self.dtype, DTYPES, "dtype")
        if self.param_dtype is not None:
            check_choice(self.param_dtype, DTYPES, "param_dtype")
        check(len(self.mesh) == 3 and all(isinstance(m, int) and (m >= 1 or m == -1)
                                          for m in self.mesh) and list(self.mesh).count(-1) <= 1,
              "mesh", f"must be [data, fsdp, tensor] sizes (one may be -1), got {self.mesh}")

    @classmethod
    def load(cls, path: str | None = None, overrides: Sequence[str] = ()) -> GenerateConfig:
        """A YAML file (optional) with `key=value` overrides: the loader every command uses."""
        return schema.load(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_paths(self) -> None:
        """Refuses missing inputs (ConfigError naming the setting) before any model loads."""
        model = os.path.expanduser(self.model)
        if not os.path.exists(model):
            raise ConfigError(f"model: {self.model!r} does not exist; pass a Hugging Face "
                              "directory, a .gguf file or a kdjax run directory")
        if self.prompts is not None:
            schema.check_dir(self.prompts, "prompts", what="example store",
                             hint="; write one with `kdjax pack --layout examples`")
        if self.mode == "expand" and not os.path.isfile(os.path.expanduser(
                self.expand.seed_file)):
            raise ConfigError(f"expand.seed_file: {self.expand.seed_file!r} does not exist")
        schema.check_dir(self.tokenizer, "tokenizer", what="tokenizer directory")


@dataclasses.dataclass(frozen=True)
class FilterCommandConfig:
    """The settings of `kdjax filter`: the `filter` section alone."""

    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    """Curation of the completions."""
