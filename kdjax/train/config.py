"""Experiment configuration: frozen, validated dataclasses mirrored by YAML.

A run is described by one `Config` (sections `model`, `teacher`, `data`, `store`,
`objective`, `optimizer`, `mesh`, `checkpoint`, `eval`, `logging`, plus top-level
`run_dir`, `seed`, `steps`, `global_batch_size`, `micro_batches`). Each section checks
its own fields in `__post_init__`; `Config.__post_init__` checks the rules that span
sections. Everything that the file alone decides fails here, before any model is built
or compiled; parsing imports no JAX and reads no file but the YAML. Rules that need the
model directories (their config.json) run in `check_checkpoints()`, rules that need the
device count (the -1 mesh axis) in `check_devices(n)`: the trainer calls both first.

    config = load_config("configs/quickstart.yaml", ["optimizer.lr=1e-3", "steps=50"])
    config.objective.temperature_at(step, config.steps)
    tx = config.optimizer.build(config.steps)                 # optax transformation
    objective = config.objective.build(config.teacher_source, config.steps, manifest)

Override values are parsed as YAML (`eval.every=0` is an int, `model.path=null` is None,
`objective.hidden.layer_map={1: 3}` is a dict). An unknown key is an error that names
the nearest valid key. Levanter/marin style: sections are plain dataclasses, the YAML
file mirrors them one to one, and `to_yaml()` writes a file that loads back equal.
Relative paths are relative to the working directory `kdjax` runs in, not to the YAML
file. The generic machinery (typed building, overrides, YAML, help) is `kdjax.schema`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from kdjax import schema
from kdjax.catalog import (
    DIVERGENCES,
    HIDDEN_LOSSES,
    REQUIRED,
    SPARSE_STORE_MODES,
    STORE_MODES,
)
from kdjax.models.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
from kdjax.schema import ConfigError, check, check_choice

__all__ = [
    "AttentionTerm", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "HiddenTerm", "LoggingConfig", "MeshConfig", "ModelConfig", "ObjectiveConfig",
    "OnPolicyConfig", "OptimizerConfig", "RankingConfig", "Schedule", "StoreConfig",
    "TeacherConfig", "apply_overrides", "config_from_dict", "load_config",
]


def _frozen(cls):
    return dataclasses.dataclass(frozen=True)(cls)


def _hf_field(path: str | None, name: str) -> int | None:
    """An int field of `<path>/config.json` when the directory exists locally (else None).
    Only `Config.check_checkpoints` and the size properties read it, never parsing."""
    if not path:
        return None
    cfg = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        data = json.load(f)
    data = data.get("text_config", data)  # multimodal wrappers nest the LM config
    value = data.get(name)
    return int(value) if value is not None else None


# ----------------------------------------------------------------------- sections


@_frozen
class ModelConfig:
    """The student: loaded from a checkpoint, taken from some of the teacher's layers, or
    built from scratch (exactly one of path, init_from, init)."""

    path: str | None = None
    """HF checkpoint directory (or kdjax `export` output, or a `.gguf` file) to start from."""
    init: dict | None = None
    """Inline `kdjax.models.DecoderConfig` fields to train from scratch (random init)."""
    init_from: str | None = None
    """A teacher checkpoint (HF directory or `.gguf` file) whose embeddings, final norm,
    lm_head and `keep_layers` start the student (DistilBERT / Minitron-style depth
    pruning; `kdjax.models.init_from_teacher`)."""
    keep_layers: list | None = None
    """With init_from: the teacher layers the student keeps, strictly increasing, e.g.
    [0, 3, 6, 9] (the student has len(keep_layers) layers)."""
    dtype: str = "bfloat16"
    """Compute dtype of activations and matmuls."""
    param_dtype: str = "float32"
    """Master-weight dtype (the optimizer state follows it)."""
    remat: str = "none"
    """Per-layer rematerialization policy: none | full | dots | dots_no_batch."""
    attention_impl: str = "auto"
    """Attention kernel: auto (the platform's: cpu → xla, gpu → cudnn, tpu → splash) |
    xla | cudnn | splash."""
    scan_layers: bool = True
    """Run the stacked decoder layers with one scanned body (compile time flat in depth);
    false runs a Python loop over them (same values)."""

    def __post_init__(self):
        given = [k for k in ("path", "init", "init_from") if getattr(self, k) is not None]
        check(len(given) == 1, "model",
              "give exactly one of model.path (a Hugging Face directory), model.init "
              "(inline DecoderConfig fields) or model.init_from (a teacher checkpoint, with "
              f"model.keep_layers); got {', '.join(given) or 'none'}")
        check((self.keep_layers is not None) == (self.init_from is not None),
              "model.keep_layers", "goes with model.init_from (the teacher layers the "
              f"student keeps, e.g. [0, 3, 6]); got keep_layers={self.keep_layers!r}")
        if self.keep_layers is not None:
            keep = self.keep_layers
            ints = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in keep)
            check(bool(keep) and ints and all(a < b for a, b in zip(keep, keep[1:])),
                  "model.keep_layers", "must be a non-empty, strictly increasing list of "
                  f"teacher layer indices (ints >= 0), e.g. [0, 3, 6]; got {keep!r}")
        check_choice(self.dtype, DTYPES, "model.dtype")
        check_choice(self.param_dtype, DTYPES, "model.param_dtype")
        check_choice(self.remat, REMAT_POLICIES, "model.remat")
        check_choice(self.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
        if self.init is not None:
            self.decoder_config()  # validates the inline fields now, not at build time

    @property
    def vocab_size(self) -> int | None:
        """Known vocabulary size (from `init` or the local `config.json`), else None."""
        if self.init is not None:
            return self.init.get("vocab_size")
        return _hf_field(self.path or self.init_from, "vocab_size")

    @property
    def num_layers(self) -> int | None:
        """Known number of decoder blocks, else None."""
        if self.init is not None:
            return self.init.get("num_layers")
        if self.keep_layers is not None:
            return len(self.keep_layers)
        return _hf_field(self.path, "num_hidden_layers")

    def decoder_config(self):
        """`kdjax.models.DecoderConfig` for `init` (from scratch), with this section's
        dtypes and remat policy; unknown or conflicting fields and the model's own
        validation are reported against model.init."""
        from kdjax.models.config import DecoderConfig

        init, section, key = self.init or {}, self.overrides(), "model.init"
        names = [f.name for f in dataclasses.fields(DecoderConfig)]
        for name in init:
            if name not in names:
                raise ConfigError(f"{key}: unknown DecoderConfig field {name!r}"
                                  f"{schema.did_you_mean(str(name), names)}; valid: {names}")
            if name in section:
                raise ConfigError(f"{key}: set {name} on the model section (model.{name}), "
                                  "not inside init")
        try:
            return DecoderConfig(**init, **section)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None

    def overrides(self) -> dict:
        """The DecoderConfig fields this section sets (for init and for `from_pretrained`)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                    attention_impl=self.attention_impl, scan_layers=self.scan_layers)


@_frozen
class TeacherConfig:
    """An online teacher, run inside the train step (forward only, never saved)."""

    path: str | None = None
    """HF checkpoint directory of the teacher for online KD; None for offline (store) KD."""
    dtype: str = "bfloat16"
    """Compute and parameter dtype of the frozen teacher: bfloat16 by default (it has no
    optimizer state, so bf16 weights halve its memory; matmuls accumulate in f32, and the
    fused loss, the default, computes the teacher's logits in f32); float32 for full
    precision."""
    remat: str = "full"
    """Teacher remat policy (none | full | dots | dots_no_batch); its activations are not
    needed for a backward pass, so full remat costs nothing extra."""
    truncate_vocab: bool = False
    """Allow teacher/student vocab sizes that differ only by padding rows (e.g. Qwen2.5-7B
    152064 vs 0.5B 151936, one tokenizer): distributions use the first min(V_s, V_t) ids."""

    def __post_init__(self):
        check_choice(self.dtype, DTYPES, "teacher.dtype")
        check_choice(self.remat, REMAT_POLICIES, "teacher.remat")

    @property
    def vocab_size(self) -> int | None:
        return _hf_field(self.path, "vocab_size")

    @property
    def num_layers(self) -> int | None:
        return _hf_field(self.path, "num_hidden_layers")


@_frozen
class DataConfig:
    """Token stores for training and held-out evaluation (see `kdjax.data`)."""

    train: str
    """Token store directory of packed training rows (`kdjax pack` writes one)."""
    eval: str | None = None
    """Held-out token store directory; None disables periodic eval."""
    dataset: str | None = None
    """Optional raw source (data files / glob / directory, or a `datasets` name) that
    `kdjax train` packs into `train` (and `eval`) when `train` does not exist yet, as
    `kdjax pack` would; `train` must then be `<dir>/train` (and `eval` `<dir>/eval`)."""
    split: str = "train"
    """Split of `dataset` to read."""
    text_field: str | None = None
    """Column of `dataset` with the text; None infers it (text / messages / prompt+response)."""
    tokenizer: str | None = None
    """Tokenizer directory used to pack `dataset` (and copied by `kdjax export`)."""
    seq_len: int | None = None
    """Tokens per packed row when packing `dataset`."""
    eval_fraction: float = 0.0
    """Fraction of `dataset` documents held out into `eval` when packing."""
    prefetch: int = 2
    """Batches the loader reads ahead in a background thread."""

    def __post_init__(self):
        check(bool(self.train), "data.train", "a token store path is required")
        check(self.prefetch >= 0, "data.prefetch", f"must be >= 0, got {self.prefetch}")
        check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction",
              f"must be in [0, 1), got {self.eval_fraction}")
        if self.seq_len is not None:
            check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        if self.dataset is None:
            return
        check(self.tokenizer is not None and self.seq_len is not None, "data.dataset",
              "packing a dataset needs data.tokenizer and data.seq_len")
        root = os.path.dirname(os.path.normpath(self.train))
        check(os.path.basename(os.path.normpath(self.train)) == "train", "data.train",
              f"packing writes <dir>/train and <dir>/eval, so data.train must end in /train, "
              f"got {self.train!r}")
        want_eval = os.path.join(root, "eval")
        check(self.eval_fraction == 0 or (self.eval is not None and os.path.normpath(
            self.eval) == want_eval), "data.eval", f"with eval_fraction > 0 set data.eval="
              f"{want_eval} (where packing writes the held-out rows), got {self.eval!r}")

    @property
    def pack_dir(self) -> str:
        """Directory `kdjax pack` writes `train/` (and `eval/`) into."""
        return os.path.dirname(os.path.normpath(self.train))


@_frozen
class StoreConfig:
    """The precomputed teacher-signal store (offline KD, see `kdjax.teacher`)."""

    path: str | None = None
    """Teacher store directory matching `data.train`; None for online KD or CE only."""
    eval_path: str | None = None
    """Teacher store for `data.eval` (enables KL-to-teacher and top-1 agreement in eval).
    It may be set without `path`: a hard-label run (objective.alpha=1) is then evaluated
    against the same teacher as the distilled one."""
    mode: str | None = None
    """Expected store mode (dense | topk | sampled); None accepts whatever the store has.
    (A store whose data, tokenizer or vocabulary differ from the run is always refused.)"""

    def __post_init__(self):
        if self.mode is not None:
            check_choice(self.mode, STORE_MODES, "store.mode")


@_frozen
class Schedule:
    """How a scalar (temperature, alpha) moves from its start value over training."""

    kind: str = "constant"
    """constant | linear | cosine."""
    end: float | None = None
    """Value reached after `steps` (required unless constant)."""
    steps: int | None = None
    """Steps to go from start to end; None means the whole run (`Config.steps`)."""

    def __post_init__(self):
        check_choice(self.kind, ("constant", "linear", "cosine"), "kind")
        check(self.kind == "constant" or self.end is not None, "end",
              f"a {self.kind} schedule needs an end value")
        check(self.steps is None or self.steps > 0, "steps", f"must be > 0, got {self.steps}")

    def value(self, start: float, step, total_steps: int):
        """Scheduled value at `step` (an int or a traced scalar; returns the same kind)."""
        if self.kind == "constant" or self.end is None:
            return start
        import jax.numpy as jnp

        frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(self.steps or total_steps),
                        0.0, 1.0)
        if self.kind == "linear":
            return start + (self.end - start) * frac
        return self.end + (start - self.end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))

    def build(self, start: float, total_steps: int):
        """A float when constant (static in the step), else a function step -> value."""
        if self.kind == "constant" or self.end is None:
            return float(start)
        return lambda step: self.value(start, step, total_steps)


def _check_layer_map(layer_map: dict, key: str) -> None:
    for s, t in layer_map.items():
        ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in (s, t))
        check(ok, key, f"entries must map a student layer index to a teacher layer index "
              f"(ints >= 0), got {s!r}: {t!r}")


def _pairs(layer_map: dict, weight: float) -> tuple[tuple[int, int], ...]:
    """Sorted (student, teacher) layer pairs of an active term (none when weight is 0)."""
    return tuple(sorted((int(s), int(t)) for s, t in layer_map.items())) if weight > 0 else ()


@_frozen
class HiddenTerm:
    """Hidden-state matching: loss on student layer s vs teacher layer t, per token."""

    weight: float = 0.0
    """Weight of the term in the total loss; 0 disables it."""
    loss: str = "mse"
    """mse | cosine (`kdjax.losses.hidden_mse` / `hidden_cosine`)."""
    layer_map: dict = dataclasses.field(default_factory=dict)
    """Student → teacher residual-stream index, e.g. {4: 14, 8: 28}: 0 is the embedding
    output, i the input of block i, num_layers the final normed hidden state."""
    projection: bool = True
    """Learn a linear map [H_s, H_t] per mapped layer (needed when hidden sizes differ);
    it trains with the student and is checkpointed, not exported."""

    def __post_init__(self):
        check(self.weight >= 0, "objective.hidden.weight", f"must be >= 0, got {self.weight}")
        check_choice(self.loss, HIDDEN_LOSSES, "objective.hidden.loss")
        _check_layer_map(self.layer_map, "objective.hidden.layer_map")
        check(self.weight == 0 or self.layer_map, "objective.hidden.layer_map",
              "hidden.weight > 0 needs a layer_map such as {3: 11}")


@_frozen
class AttentionTerm:
    """Attention-distribution matching (MiniLM): KL(teacher ‖ student) over keys."""

    weight: float = 0.0
    """Weight of the term in the total loss; 0 disables it."""
    layer_map: dict = dataclasses.field(default_factory=dict)
    """Student → teacher block index in [0, num_layers) (head counts must match)."""

    def __post_init__(self):
        check(self.weight >= 0, "objective.attention.weight",
              f"must be >= 0, got {self.weight}")
        _check_layer_map(self.layer_map, "objective.attention.layer_map")
        check(self.weight == 0 or self.layer_map, "objective.attention.layer_map",
              "attention.weight > 0 needs a layer_map such as {3: 11}")


ON_POLICY_LOSSES = ("gkd", "rkl_reward", "minillm")
ROLLOUT_SOURCES = ("student", "teacher", "mixed")


@_frozen
class OnPolicyConfig:
    """On-policy distillation (GKD, on-policy reverse KL, MiniLLM): completions sampled
    inside the step from the current student (or the teacher, or their mixture) and
    scored by the online teacher. Needs `teacher.path` and an example store in
    `data.train` (`kdjax pack --layout examples`). See `kdjax.train.on_policy`."""

    loss: str | None = None
    """null (off) | gkd (objective.divergence per completion token, e.g. jsd β = 0.5) |
    rkl_reward (policy gradient on r = log p − log q_old) | minillm (length-normalised
    policy gradient + the exact single-step reverse KL, PPO clip)."""
    fraction: float = 1.0
    """λ in [0, 1]: probability that an example's completion is sampled (drawn per
    example from the step's key); the others keep the dataset completion."""
    source: str = "student"
    """Who samples: student (on-policy), teacher (online SeqKD) or mixed (MiniLLM's
    α·p + (1 − α)·q, importance-weighted)."""
    mix_alpha: float = 0.2
    """α of teacher-mixed sampling (source=mixed)."""
    max_new_tokens: int = 32
    """Tokens sampled per completion (the rollout's fixed width)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy); separate from objective.temperature."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (null: all)."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1] (null: off)."""
    stop_ids: list = dataclasses.field(default_factory=list)
    """Token ids that end a completion besides the student's eos id (kept, trained on)."""
    gamma: float | None = None
    """Discount γ in [0, 1] of the advantages; null = 0 for rkl_reward, 1 for minillm."""
    clip_eps: float | None = None
    """PPO clip ε of the importance ratio; null = none for rkl_reward, 0.2 for minillm."""
    updates_per_rollout: int = 1
    """Optimizer updates per rollout (MiniLLM's PPO-style reuse): each step samples once
    and updates k times on those samples; schedules count updates (steps × k)."""

    def __post_init__(self):
        k = "objective.on_policy"
        if self.loss is not None:
            check_choice(self.loss, ON_POLICY_LOSSES, f"{k}.loss")
        check_choice(self.source, ROLLOUT_SOURCES, f"{k}.source")
        check(0.0 <= self.fraction <= 1.0, f"{k}.fraction",
              f"must be in [0, 1], got {self.fraction}")
        check(0.0 <= self.mix_alpha <= 1.0, f"{k}.mix_alpha",
              f"must be in [0, 1], got {self.mix_alpha}")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
              f"{k}.max_new_tokens", f"must be an int >= 1, got {self.max_new_tokens!r}")
        check(self.temperature >= 0 and math.isfinite(self.temperature), f"{k}.temperature",
              f"must be >= 0 (0 = greedy), got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, f"{k}.top_k",
              f"must be >= 1 or null, got {self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1, f"{k}.top_p",
              f"must be in (0, 1] or null, got {self.top_p}")
        check(all(isinstance(i, int) and i >= 0 for i in self.stop_ids), f"{k}.stop_ids",
              f"must be a list of token ids (ints >= 0), got {self.stop_ids!r}")
        check(self.gamma is None or 0.0 <= self.gamma <= 1.0, f"{k}.gamma",
              f"must be in [0, 1] or null, got {self.gamma}")
        check(self.clip_eps is None or self.clip_eps > 0, f"{k}.clip_eps",
              f"must be > 0 or null, got {self.clip_eps}")
        check(isinstance(self.updates_per_rollout, int) and self.updates_per_rollout >= 1,
              f"{k}.updates_per_rollout", f"must be an int >= 1, got "
              f"{self.updates_per_rollout!r}")
        check(self.updates_per_rollout == 1 or self.loss in ("rkl_reward", "minillm"),
              f"{k}.updates_per_rollout", "reusing a rollout needs importance ratios: "
              f"loss rkl_reward or minillm (got {self.loss!r})")
        check(self.source != "mixed" or self.loss == "minillm", f"{k}.source",
              "mixed (teacher-mixed) sampling is MiniLLM's: set objective.on_policy.loss="
              f"minillm, or source=student|teacher (got loss={self.loss!r})")

    @property
    def active(self) -> bool:
        return self.loss is not None


RANKING_METHODS = ("dpo", "ipo", "simpo", "rrhf", "pro", "listwise_kl", "distillm2")
RANKING_REFERENCES = ("stored", "online", "none")


@_frozen
class RankingConfig:
    """Ranking optimization on preference rows (`kdjax pack --layout preferences` of a
    `kdjax score` dataset): DPO, IPO, SimPO, RRHF, PRO, listwise KL, or DistiLLM-2's
    contrastive form. See `kdjax.train.ranking`."""

    method: str | None = None
    """null (off) | dpo | ipo | simpo | rrhf | pro | listwise_kl | distillm2."""
    beta: float | None = None
    """β; null = the method's default (dpo/ipo 0.1, simpo 2.0, distillm2 1.0)."""
    gamma: float = 0.5
    """SimPO's target margin γ."""
    label_smoothing: float = 0.0
    """DPO's label smoothing ε in [0, 0.5] (conservative DPO)."""
    temperature: float = 1.0
    """listwise_kl's temperature over the candidates' scores."""
    sft_weight: float | None = None
    """Weight of an SFT term on the best candidate; null = 1 for rrhf, else 0."""
    reference: str | None = None
    """stored (ref_logps in the store, `kdjax score reference=DIR`) | online (the frozen
    reference is teacher.path) | none; null = stored for dpo/ipo, none otherwise."""
    pairs: str = "best_worst"
    """Pairwise methods: best_worst (one pair per prompt) or all (every scored pair)."""
    average: bool | None = None
    """Length-normalised sequence log-probs; null = the method's paper (simpo, rrhf, pro,
    listwise_kl average; dpo, ipo sum)."""
    skew_alpha: float = 0.1
    """distillm2's skew α."""

    def __post_init__(self):
        k = "objective.ranking"
        if self.method is not None:
            check_choice(self.method, RANKING_METHODS, f"{k}.method")
        if self.reference is not None:
            check_choice(self.reference, RANKING_REFERENCES, f"{k}.reference")
        check_choice(self.pairs, ("best_worst", "all"), f"{k}.pairs")
        check(self.beta is None or self.beta > 0, f"{k}.beta", f"must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing <= 0.5, f"{k}.label_smoothing",
              f"must be in [0, 0.5], got {self.label_smoothing}")
        check(self.temperature > 0, f"{k}.temperature", f"must be > 0, got {self.temperature}")
        check(self.sft_weight is None or self.sft_weight >= 0, f"{k}.sft_weight",
              f"must be >= 0, got {self.sft_weight}")
        check(0.0 <= self.skew_alpha < 1.0, f"{k}.skew_alpha",
              f"must be in [0, 1), got {self.skew_alpha}")

    @property
    def active(self) -> bool:
        return self.method is not None

    @property
    def uses_teacher(self) -> bool:
        """Needs teacher.path: the online reference, or distillm2's teacher."""
        return self.method == "distillm2" or self.reference == "online"


@_frozen
class ObjectiveConfig:
    """loss = (1 − α)·s·D(p_T ‖ q_T) + α·CE + w_h·hidden + w_a·attention,
    with s = T² when `t2_scaling` (Hinton et al. 2015), else 1."""

    divergence: str = "forward_kl"
    """Any name in `kdjax.losses.DIVERGENCES` (top-k and sampled stores: forward_kl only)."""
    divergence_kwargs: dict = dataclasses.field(default_factory=dict)
    """Extra divergence arguments, e.g. {beta: 0.5} for jsd, {alpha: 0.1} for skew_*."""
    temperature: float = 1.0
    """Distillation temperature T at step 0 (both distributions are softened by T)."""
    temperature_schedule: Schedule = dataclasses.field(default_factory=Schedule)
    """How T moves during training (default: constant)."""
    alpha: float = 0.0
    """Hard-label cross-entropy weight α in [0, 1]; 1 is plain CE training (no teacher)."""
    alpha_schedule: Schedule = dataclasses.field(default_factory=Schedule)
    """How α moves during training (default: constant)."""
    t2_scaling: bool = True
    """Multiply the divergence by T² so gradient scale does not shrink with T."""
    hidden: HiddenTerm = dataclasses.field(default_factory=HiddenTerm)
    """Hidden-state term (teacher hidden states from the store or the online teacher)."""
    attention: AttentionTerm = dataclasses.field(default_factory=AttentionTerm)
    """Attention term (online teacher only: stores hold no attention scores)."""
    use_fused: bool = True
    """Use `kdjax.losses.fused_distill` (no [N, V] logits beyond one chunk)."""
    chunk_size: int | None = None
    """Tokens per chunk in the fused kernel; None lets the kernel choose."""
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
    """On-policy distillation (GKD / rkl_reward / MiniLLM); off unless `loss` is set."""
    ranking: RankingConfig = dataclasses.field(default_factory=RankingConfig)
    """Ranking optimization (DPO, PRO, …); off unless `method` is set."""

    def __post_init__(self):
        check_choice(self.divergence, list(DIVERGENCES), "objective.divergence")
        _check_divergence_kwargs(self.divergence, self.divergence_kwargs,
                                 "objective.divergence_kwargs")
        check(self.temperature > 0, "objective.temperature",
              f"must be > 0, got {self.temperature}")
        end_t = self.temperature_schedule.end
        check(end_t is None or end_t > 0, "objective.temperature_schedule.end",
              f"must be > 0, got {end_t}")
        for name, value in (("alpha", self.alpha), ("alpha_schedule.end",
                                                     self.alpha_schedule.end)):
            check(value is None or 0.0 <= value <= 1.0, f"objective.{name}",
                  f"must be in [0, 1], got {value}")
        check(self.chunk_size is None or self.chunk_size > 0, "objective.chunk_size",
              f"must be > 0, got {self.chunk_size}")

    def temperature_at(self, step, total_steps: int):
        """T at `step` (python number or traced scalar)."""
        return self.temperature_schedule.value(self.temperature, step, total_steps)

    def alpha_at(self, step, total_steps: int):
        """α at `step` (python number or traced scalar)."""
        return self.alpha_schedule.value(self.alpha, step, total_steps)

    @property
    def needs_teacher(self) -> bool:
        """Whether any term needs a teacher signal (store or online model)."""
        ce_only = self.alpha == 1.0 and self.alpha_schedule.kind == "constant"
        if self.ranking.active:
            return self.ranking.uses_teacher
        return (not ce_only or self.hidden.weight > 0 or self.attention.weight > 0
                or self.on_policy.active)

    def build(self, teacher_source: str, total_steps: int,
              store_manifest: Mapping[str, Any] | None = None, *,
              eos_ids: tuple[int, ...] = (), pad_id: int = 0):
        """The `kdjax.train.objective.Objective` of this section (an
        `kdjax.train.on_policy.OnPolicyObjective` around it when `on_policy.loss` is set).

        Args:
          teacher_source: "store" (offline), "online" or "none" (`Config.teacher_source`).
          total_steps: the run's steps (`Config.steps`), the length of the α and T
            schedules that set no `steps` of their own.
          store_manifest: the teacher store's manifest for offline KD (its mode, k,
            num_samples and temperature are kept), or None.
          eos_ids, pad_id: the student's end-of-sequence ids (they end a sampled
            completion) and padding id (on-policy only).
        """
        from kdjax.train.objective import Objective

        if self.ranking.active:
            from kdjax.train.ranking import RankingObjective

            r = self.ranking
            return RankingObjective(
                method=r.method, beta=r.beta, gamma=r.gamma,
                label_smoothing=r.label_smoothing, temperature=r.temperature,
                sft_weight=r.sft_weight, reference=r.reference, pairs=r.pairs,
                average=r.average, skew_alpha=r.skew_alpha, pad_id=int(pad_id),
                chunk_size=self.chunk_size)
        manifest = {k: store_manifest[k] for k in ("mode", "num_samples", "k", "temperature")
                    if store_manifest and k in store_manifest}
        op = self.on_policy
        divergence, kwargs = self.divergence, self.divergence_kwargs
        if op.loss == "minillm":  # its single-step term is the exact reverse KL
            divergence, kwargs = "reverse_kl", {}
        base = Objective(
            divergence=divergence,
            divergence_kwargs=tuple(sorted(kwargs.items())),
            alpha=self.alpha_schedule.build(self.alpha, total_steps),
            temperature=self.temperature_schedule.build(self.temperature, total_steps),
            t2_scaling=self.t2_scaling, teacher_source=teacher_source,
            store_manifest=tuple(sorted(manifest.items())), fused=self.use_fused,
            chunk_size=self.chunk_size,
            hidden_layers=_pairs(self.hidden.layer_map, self.hidden.weight),
            hidden_loss=self.hidden.loss, hidden_weight=self.hidden.weight,
            hidden_projection=self.hidden.projection,
            attention_layers=_pairs(self.attention.layer_map, self.attention.weight),
            attention_weight=self.attention.weight)
        if not op.active:
            return base
        from kdjax.train.on_policy import OnPolicyObjective

        default_gamma, default_clip = (1.0, 0.2) if op.loss == "minillm" else (0.0, None)
        return OnPolicyObjective(
            base=base, loss=op.loss, fraction=float(op.fraction), source=op.source,
            mix_alpha=float(op.mix_alpha), max_new_tokens=op.max_new_tokens,
            temperature=float(op.temperature), top_k=op.top_k, top_p=op.top_p,
            stop_ids=tuple(dict.fromkeys([*eos_ids, *op.stop_ids])), pad_id=int(pad_id),
            gamma=default_gamma if op.gamma is None else float(op.gamma),
            clip_eps=default_clip if op.clip_eps is None else float(op.clip_eps),
            updates_per_rollout=int(op.updates_per_rollout))


def _check_divergence_kwargs(divergence: str, kwargs: dict, key: str) -> None:
    """Extra divergence arguments must be keyword arguments of the catalog function, and
    the ones without a default must be given (`kdjax.catalog.DIVERGENCES`)."""
    params = DIVERGENCES[divergence]
    names = list(params)
    for name in kwargs:
        if name not in names:
            raise ConfigError(f"{key}: {divergence} takes no argument {name!r}"
                              f"{schema.did_you_mean(str(name), names)}; it takes "
                              f"{names or 'none'} (temperature is objective.temperature)")
    missing = [n for n in names if params[n] == REQUIRED and n not in kwargs]
    check(not missing, key, f"{divergence} needs {missing}, e.g. "
          f"objective.divergence_kwargs={{{', '.join(f'{n}: 1.0' for n in missing)}}}")


LR_DECAYS = ("cosine", "linear", "constant")


@_frozen
class OptimizerConfig:
    """optax AdamW with linear warmup, then cosine/linear/constant decay, and clipping."""

    lr: float = 3e-4
    """Peak learning rate (reached after `warmup_steps`)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `lr`."""
    decay: str = "cosine"
    """cosine | linear | constant, from `lr` to `lr·min_lr_ratio` at the last step."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW), applied to matrices only (not norms/biases)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float | None = 1.0
    """Global gradient-norm clip; None disables clipping."""
    max_nonfinite: int = 5
    """Stop with an error after this many consecutive skipped non-finite updates."""

    def __post_init__(self):
        check(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, "optimizer.warmup_steps",
              f"must be >= 0, got {self.warmup_steps}")
        check_choice(self.decay, LR_DECAYS, "optimizer.decay")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio",
              f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.weight_decay >= 0, "optimizer.weight_decay",
              f"must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"optimizer.{name}", f"must be in [0, 1), got {value}")
        check(self.eps > 0, "optimizer.eps", f"must be > 0, got {self.eps}")
        check(self.clip_norm is None or self.clip_norm > 0, "optimizer.clip_norm",
              f"must be > 0 or null, got {self.clip_norm}")
        check(self.max_nonfinite >= 1, "optimizer.max_nonfinite",
              f"must be >= 1, got {self.max_nonfinite}")

    def schedule(self, total_steps: int):
        """The optax learning-rate schedule over `total_steps`: linear warmup from 0 to
        `lr`, then `decay` to `lr·min_lr_ratio` at `total_steps`."""
        import optax

        check(total_steps >= 1, "steps", f"must be >= 1, got {total_steps}")
        warmup = min(self.warmup_steps, total_steps - 1)
        lr, rest = self.lr, total_steps - warmup
        if self.decay == "cosine":
            decay = optax.cosine_decay_schedule(lr, rest, alpha=self.min_lr_ratio)
        elif self.decay == "linear":
            decay = optax.linear_schedule(lr, lr * self.min_lr_ratio, rest)
        else:
            decay = optax.constant_schedule(lr)
        if not warmup:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])

    def build(self, total_steps: int):
        """The optax transformation (Loshchilov & Hutter, 2019): global-norm clipping
        (unless `clip_norm` is None), then AdamW on `schedule(total_steps)` with weight
        decay on weight matrices only (`kdjax.train.state.decay_mask`)."""
        import optax

        from kdjax.train.state import decay_mask

        adamw = optax.adamw(self.schedule(total_steps), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay, mask=decay_mask)
        if self.clip_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)


@_frozen
class MeshConfig:
    """Device mesh sizes (see `kdjax.sharding.make_mesh`); one may be -1 (the rest)."""

    data: int = -1
    """Pure data parallelism (replicated parameters)."""
    fsdp: int = 1
    """Fully sharded data parallelism (parameters and optimizer state sharded)."""
    tensor: int = 1
    """Tensor parallelism over heads / MLP / vocabulary."""

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            check(size == -1 or size >= 1, f"mesh.{name}", f"must be >= 1 or -1, got {size}")
        check(list(sizes.values()).count(-1) <= 1, "mesh",
              f"at most one axis may be -1, got {sizes}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for `num_devices` devices, -1 filled in."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            check(num_devices % known == 0, "mesh",
                  f"{num_devices} devices do not divide by the fixed axes ({known}) of "
                  f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}")
            sizes[sizes.index(-1)] = num_devices // known
        check(math.prod(sizes) == num_devices, "mesh",
              f"data×fsdp×tensor = {math.prod(sizes)} but {num_devices} devices are "
              "available; set one axis to -1 to use all of them")
        return tuple(sizes)

    def data_parallel_size(self, num_devices: int | None = None) -> int | None:
        """Ways the batch is split (data × fsdp); None if unknown without a device count."""
        if num_devices is None and -1 in (self.data, self.fsdp):
            return None
        data, fsdp, _ = (self.resolve(num_devices) if num_devices is not None
                         else (self.data, self.fsdp, self.tensor))
        return data * fsdp

    def make(self, devices=None):
        """The `jax.sharding.Mesh` for these sizes (all devices unless given)."""
        from kdjax.sharding import make_mesh

        return make_mesh(self.data, self.fsdp, self.tensor, devices=devices)


@_frozen
class CheckpointConfig:
    """Orbax checkpoints of the student, optimizer state, step and RNG in `run_dir`."""

    every: int = 1000
    """Save every this many steps (0: only at the end)."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    async_save: bool = True
    """Write in the background while training continues."""

    def __post_init__(self):
        check(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@_frozen
class EvalConfig:
    """Periodic held-out evaluation on `data.eval`: CE / perplexity, and with a teacher
    signal KL(teacher ‖ student) at T = 1 and top-1 agreement."""

    every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    batches: int = 8
    """Batches per evaluation."""
    batch_size: int | None = None
    """Rows per eval batch; None uses `global_batch_size`."""

    def __post_init__(self):
        check(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        check(self.batches >= 1, "eval.batches", f"must be >= 1, got {self.batches}")
        check(self.batch_size is None or self.batch_size >= 1, "eval.batch_size",
              f"must be >= 1, got {self.batch_size}")


@_frozen
class LoggingConfig:
    """Where metrics go; all paths live under `run_dir`."""

    every: int = 10
    """Log token-weighted averages over windows of this many steps."""
    jsonl: bool = True
    """Append metrics to `run_dir/metrics.jsonl`."""
    tensorboard: bool = True
    """Write TensorBoard event files to `run_dir/tensorboard/`."""
    plot: bool = True
    """Plot the curves to `run_dir/curves.png` at the end."""
    progress: bool = True
    """Show a tqdm progress bar (step, tokens/s, loss, ETA)."""

    def __post_init__(self):
        check(self.every >= 1, "logging.every", f"must be >= 1, got {self.every}")


# ------------------------------------------------------------------------- the run


@_frozen
class Config:
    """One distillation run. `load_config` builds it from YAML plus overrides."""

    run_dir: str
    """Directory for checkpoints, metrics, plots and the resolved `config.yaml`."""
    steps: int
    """Optimizer steps to train for (a resumed run continues up to this step)."""
    global_batch_size: int
    """Rows (packed sequences) per optimizer step, over all hosts and micro-batches."""
    model: ModelConfig
    """The student."""
    data: DataConfig
    """Training / held-out token stores."""
    micro_batches: int = 1
    """Gradient-accumulation micro-batches per step (token-weighted sum, count)."""
    seed: int = 0
    """Seed of parameter init, data order and any sampling."""
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    """Online teacher (leave `path` empty for offline KD from `store`)."""
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    """Precomputed teacher-signal store (offline KD)."""
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    """What is minimized."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """AdamW, schedule, clipping, non-finite guard."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """Device mesh (data, fsdp, tensor)."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Held-out evaluation cadence."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics outputs."""

    # names users bring from other trainers, which string similarity alone would miss
    ALIASES = {"learning_rate": "lr", "batch_size": "global_batch_size", "num_steps": "steps",
               "max_steps": "steps", "train_steps": "steps", "temp": "temperature",
               "warmup": "warmup_steps", "grad_clip": "clip_norm", "max_grad_norm": "clip_norm",
               "output_dir": "run_dir", "out_dir": "run_dir", "kl": "divergence",
               "loss": "divergence", "gradient_accumulation_steps": "micro_batches"}

    def __post_init__(self):
        check(bool(self.run_dir), "run_dir", "a run directory is required")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.global_batch_size >= 1, "global_batch_size",
              f"must be >= 1, got {self.global_batch_size}")
        check(self.micro_batches >= 1, "micro_batches",
              f"must be >= 1, got {self.micro_batches}")
        check(self.optimizer.warmup_steps <= self.steps, "optimizer.warmup_steps",
              f"{self.optimizer.warmup_steps} exceeds steps={self.steps}")
        self._check_teacher_signal()
        init = self.model.init or {}  # sizes known without reading a checkpoint
        self._check_vocab(init.get("vocab_size"), None)
        self._check_layers(init.get("num_layers"), None)
        self._check_batch(self.mesh.data_parallel_size())

    @property
    def teacher_source(self) -> str:
        """Where the teacher signal comes from: "online" (teacher.path), "store"
        (store.path) or "none" (hard-label training)."""
        return "online" if self.teacher.path else "store" if self.store.path else "none"

    def check_checkpoints(self) -> None:
        """The rules that need the student's and teacher's sizes from their local
        `config.json` (vocabularies agree, layer maps in range); a directory that does not
        exist (yet) is skipped. The trainer calls it before building anything."""
        self._check_vocab(self.model.vocab_size, self.teacher.vocab_size)
        self._check_layers(self.model.num_layers, self.teacher.num_layers)

    def _check_teacher_signal(self):
        online, offline = self.teacher.path is not None, self.store.path is not None
        check(not (online and offline), "teacher.path",
              "give either teacher.path (online KD) or store.path (offline KD), not both")
        ranking = self.objective.ranking
        check(not (ranking.active and self.objective.on_policy.active), "objective.ranking",
              "set either objective.ranking.method or objective.on_policy.loss, not both")
        check(not ranking.active or not offline, "store.path",
              f"the ranking objective ({ranking.method}) reads a preference store in "
              "data.train, not a teacher store; set store.path=null")
        check(not ranking.active or online or not ranking.uses_teacher, "teacher.path",
              f"objective.ranking (method={ranking.method}, reference={ranking.reference}) "
              "needs teacher.path: the frozen reference (reference=online) or distillm2's "
              "teacher")
        on_policy = self.objective.on_policy
        check(not on_policy.active or online, "objective.on_policy",
              f"on-policy loss {on_policy.loss!r} scores the sampled completions with an "
              "online teacher: set teacher.path (and no store.path)")
        check(online or offline or not self.objective.needs_teacher, "objective",
              f"alpha={self.objective.alpha} (< 1) or a hidden/attention term needs a teacher "
              "signal: set store.path (precomputed, `kdjax precompute`) or teacher.path "
              "(online), or set objective.alpha=1 for hard-label training only")
        check(self.objective.attention.weight == 0 or online, "objective.attention",
              "attention distillation needs an online teacher (teacher.path); stores hold "
              "no attention scores")
        sparse = self.store.mode in SPARSE_STORE_MODES
        check(not sparse or self.objective.divergence == "forward_kl", "objective.divergence",
              f"a {self.store.mode} store supports forward_kl only (sparse_forward_kl / "
              f"sampled_forward_kl), got {self.objective.divergence!r}; use a dense store or "
              "an online teacher for other divergences")
        check(self.store.eval_path is None or self.data.eval is not None, "store.eval_path",
              "needs data.eval (the token store it was computed from)")

    def _check_vocab(self, vs: int | None, vt: int | None):
        if vs is None or vt is None or vs == vt:
            return
        check(self.teacher.truncate_vocab, "teacher.path",
              f"teacher vocab_size {vt} differs from student vocab_size {vs}; if they share "
              "a tokenizer and differ only by padding rows set teacher.truncate_vocab=true")

    def _check_layers(self, student: int | None, teacher: int | None):
        obj = self.objective
        for side, n in (("student", student), ("teacher", teacher)):
            pick = (lambda m: list(m)) if side == "student" else (lambda m: list(m.values()))
            if n is None:
                continue
            bad = [i for i in pick(obj.hidden.layer_map) if i > n]
            check(not bad, "objective.hidden.layer_map", f"{side} residual-stream indices "
                  f"{bad} exceed its num_layers={n} (valid: 0..{n})")
            bad = [i for i in pick(obj.attention.layer_map) if i >= n]
            check(not bad, "objective.attention.layer_map", f"{side} block indices {bad} "
                  f"out of range for num_layers={n} (valid: 0..{n - 1})")

    def _check_batch(self, data_parallel: int | None):
        per_step = self.micro_batches * (data_parallel or 1)
        where = f" × data parallelism {data_parallel}" if data_parallel else ""
        check(self.global_batch_size % per_step == 0, "global_batch_size",
              f"{self.global_batch_size} is not divisible by micro_batches "
              f"{self.micro_batches}{where} = {per_step}; use a multiple of {per_step}")
        eval_rows = self.eval.batch_size
        check(eval_rows is None or not data_parallel or eval_rows % data_parallel == 0,
              "eval.batch_size", f"{eval_rows} is not divisible by data parallelism "
              f"{data_parallel}")

    def check_devices(self, num_devices: int) -> tuple[int, int, int]:
        """Mesh sizes for `num_devices`, after the batch rules that need them. Call it
        before building anything (the -1 axis is only known here)."""
        sizes = self.mesh.resolve(num_devices)
        self._check_batch(sizes[0] * sizes[1])
        return sizes

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch (global, over all devices)."""
        return self.global_batch_size // self.micro_batches

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-able) that `config_from_dict` turns back into this."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text of `to_dict()`; also written to `path` when given."""
        text = schema.dump_yaml(self.to_dict())
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of the whole config."""
        return schema.fingerprint(self.to_dict())

    def replace(self, *overrides: str) -> Config:
        """A copy with `key.sub=value` overrides applied (validated again)."""
        return apply_overrides(self, list(overrides))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds and validates a `Config` from a nested dict (unknown keys are errors)."""
    return schema.build(Config, data)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """`config` with `key.sub=value` overrides (values parsed as YAML) applied."""
    data = config.to_dict()
    for item in overrides:
        schema.set_override(Config, data, item)
    return config_from_dict(data)


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = ()) -> Config:
    """Reads a YAML config (or starts empty when `path` is None), applies `key.sub=value`
    overrides in order, and returns the validated `Config`.

    Raises:
      ConfigError (a ValueError): unknown key (naming the nearest valid one), bad type,
        bad value or an inconsistent combination, with the key and the value seen.
    """
    return schema.load(Config, path, overrides)

