"""`ScoreConfig`: what `kdjax score` runs, validated without JAX or disk reads.

YAML (`kdjax score --config score.yaml [key=value ...]`):

    model: /ckpt/teacher            # the scoring teacher: HF directory, .gguf or run directory
    data: /data/generated/train     # generated dataset, TRL pairs, prompt + completions, or
                                    # a preference dataset to re-score
    out: /data/preferences/train    # preference dataset to write (resumable)
    method: likelihood              # likelihood | judge | labels
    pairs: best_worst               # best_worst | all
    min_margin: 0.0
    reference: /ckpt/student-init   # optional: store each candidate's reference log-prob

Every setting, its default and its meaning: `kdjax score --help`; examples in
configs/score/.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from kdjax import schema
from kdjax.models.config import DTYPES
from kdjax.schema import ConfigError, check, check_choice

METHODS = ("likelihood", "judge", "labels")
FORMATS = ("auto", "generated", "scored", "pairs", "completions")
PAIRS = ("best_worst", "all")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The teacher as a judge (`method: judge`)."""

    template: str | None = None
    """YAML file with `user` (the grading request; placeholders {prompt}, {answer},
    {min_grade}, {max_grade}) and `response_prefix` (what the judge's reply starts with,
    just before the grade); null = the shipped default (configs/score/judge_template.yaml)."""
    grades: list = dataclasses.field(default_factory=lambda: list(range(1, 10)))
    """The grades (integers) the judge gives; each must be one token of the judge's
    tokenizer, so 10 (usually two tokens) is not allowed by default."""
    chat: bool | None = None
    """Wrap the request in the judge tokenizer's chat template (as the user turn, with the
    generation prompt); null = when the tokenizer has one."""

    def __post_init__(self):
        g = self.grades
        check(len(g) >= 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in g)
              and len(set(g)) == len(g), "judge.grades",
              f"must be at least two distinct integers, got {g!r}")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """One `kdjax score` run."""

    data: str = ""
    """Required: the candidates: a generated dataset (`kdjax generate --out`, K = its n),
    a preference dataset to re-score (`kdjax score --out`), or a `datasets` source (files,
    glob, directory or hub name) in the TRL format (prompt/chosen/rejected, as text or chat
    messages; implicit prompts too) or with a `prompt` and a list of `completions`."""
    out: str = ""
    """Required: the preference dataset to write; a rerun resumes it (only missing shards)."""
    model: str | None = None
    """The scoring teacher: a Hugging Face directory, a .gguf file or a kdjax run directory;
    required unless method=labels."""
    method: str = "likelihood"
    """likelihood (the teacher's mean log-prob of each completion given the prompt) | judge
    (the expected grade under the teacher's next-token distribution over the grade tokens)
    | labels (no teacher: the data's own scores, chosen 1 / rejected 0 for pair data, or
    score_chosen/score_rejected when the data has them)."""
    format: str = "auto"
    """auto | generated | scored (a preference dataset) | pairs (TRL prompt/chosen/rejected)
    | completions (prompt + a list of completions); auto tells them apart by the manifest
    kind or the columns."""
    split: str = "train"
    """The split of a `datasets` source."""
    tokenizer: str | None = None
    """Tokenizer directory that turns text data (pairs, completions) into ids; null = the
    teacher's (or the reference's with method=labels). Generated and scored data carry
    their ids; the likelihood and the reference need the data's tokenizer."""
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    """The judge (method judge)."""
    pairs: str = "best_worst"
    """Chosen/rejected pairs per prompt: best_worst (the best vs the worst candidate) | all
    (every pair whose score difference is at least min_margin)."""
    min_margin: float = 0.0
    """Smallest score difference of a pair; pairs of equal scores are never made."""
    reference: str | None = None
    """A frozen reference (e.g. the student's starting checkpoint: HF directory, .gguf or
    run directory) whose summed log-prob and token count of every candidate are stored
    (`ref_logps`, `ref_counts`); null = none."""
    batch_size: int = 8
    """Sequences per teacher forward (over all devices; rounded up to a multiple of the
    data-parallel size)."""
    shard_prompts: int = 256
    """Prompts per parquet shard: the unit a rerun redoes."""
    buckets: list | None = None
    """Sequence-length buckets (each compiles once); null = powers of two up to the
    longest sequence."""
    dtype: str = "bfloat16"
    """Compute dtype of the teacher and the reference (float32 for exact log-probs)."""
    param_dtype: str | None = None
    """Dtype the weights are loaded in; null = `dtype`."""
    mesh: list = dataclasses.field(default_factory=lambda: [-1, 1, 1])
    """(data, fsdp, tensor) device-mesh sizes; one may be -1 (all remaining devices)."""
    overwrite: bool = False
    """Replace an existing dataset written with other settings (also `--overwrite`)."""
    progress: bool = True
    """Show a progress bar (candidates, tokens/s, ETA) and the end-of-run summary."""

    ALIASES = {"teacher": "model", "judge_model": "model", "dataset": "data", "input": "data",
               "candidates": "data", "output": "out", "out_dir": "out", "ref": "reference",
               "reference_model": "reference", "bs": "batch_size", "margin": "min_margin",
               "pair_mode": "pairs", "mode": "method", "shard_examples": "shard_prompts"}
    OVERRIDE_FORM = "key=value (e.g. method=judge or judge.grades='[1,2,3,4,5]')"

    def __post_init__(self):
        check(bool(self.data), "data", "required: a generated dataset or a preference "
              "dataset source (data=...)")
        check(bool(self.out), "out", "required: the directory to write (out=...)")
        check_choice(self.method, METHODS, "method")
        check_choice(self.format, FORMATS, "format")
        check_choice(self.pairs, PAIRS, "pairs")
        if self.method == "labels":
            check(self.model is None, "model", "method=labels runs no teacher (the data's "
                  f"labels are the scores), got model={self.model!r}; unset model, or choose "
                  "method=likelihood or judge")
        else:
            check(bool(self.model), "model", f"method={self.method} needs the scoring "
                  "teacher (model=DIR); method=labels keeps the data's own labels")
        check(self.min_margin >= 0, "min_margin", f"must be >= 0, got {self.min_margin}")
        for name in ("batch_size", "shard_prompts"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be >= 1, got {value}")
        if self.buckets is not None:
            b = self.buckets
            check(bool(b) and all(isinstance(x, int) and x >= 2 for x in b)
                  and list(b) == sorted(set(b)), "buckets",
                  f"must be a non-empty increasing list of sequence lengths, got {b!r}")
        check_choice(self.dtype, DTYPES, "dtype")
        if self.param_dtype is not None:
            check_choice(self.param_dtype, DTYPES, "param_dtype")
        check(len(self.mesh) == 3 and all(isinstance(m, int) and (m >= 1 or m == -1)
                                          for m in self.mesh) and list(self.mesh).count(-1) <= 1,
              "mesh", f"must be [data, fsdp, tensor] sizes (one may be -1), got {self.mesh}")

    @classmethod
    def load(cls, path: str | None = None, overrides: Sequence[str] = ()) -> ScoreConfig:
        """A YAML file (optional) with `key=value` overrides: the loader every command uses."""
        return schema.load(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_paths(self) -> None:
        """Refuses missing inputs (ConfigError naming the setting) before any model loads."""
        for key in ("model", "reference"):
            value = getattr(self, key)
            if value is not None and not os.path.exists(os.path.expanduser(value)):
                what = "scoring teacher" if key == "model" else "reference model"
                raise ConfigError(f"{key}: the {what} {value!r} does not exist; pass a "
                                  "Hugging Face directory, a .gguf file or a kdjax run "
                                  "directory" + (", or set reference=null to store none"
                                                 if key == "reference" else ""))
        if self.judge.template is not None and not os.path.isfile(
                os.path.expanduser(self.judge.template)):
            raise ConfigError(f"judge.template: {self.judge.template!r} does not exist; pass "
                              "a YAML file like configs/score/judge_template.yaml, or null "
                              "for the default")
        schema.check_dir(self.tokenizer, "tokenizer", what="tokenizer directory")
