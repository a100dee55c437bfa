"""Model FLOPs of a step, from the architecture alone (what MFU divides by).

Per token, with P the parameters that multiply activations (every matrix; the embedding
table only when it is also the tied lm_head), d = heads·head_dim, and K the keys each
query sees (L, or the sliding window):

    forward  = 2·P + 4·layers·K·d          (QKᵀ and AV; not halved for the causal mask,
                                            as in PaLM, Chowdhery et al. 2022, app. B)
    student training step = 3 × forward = 6·P + 12·layers·K·d   (forward + backward)
    teacher forward (online, eval, precompute) = 2·P_t + 4·layers_t·K·d_t

Rematerialization is NOT counted (it is hardware work, not model work), which is why
MFU from these numbers is below the hardware FLOP utilization when remat is on.
"""

from __future__ import annotations

import dataclasses

STEPS = ("train", "eval", "precompute")


def matmul_params(cfg) -> int:
    """Parameters of a `DecoderConfig` that multiply activations: all of them but the
    embedding lookup table (which is a gather), unless it doubles as the tied lm_head."""
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return int(cfg.num_params - lookup)


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """4·layers·K·d: QKᵀ and AV of one token's forward (see module doc)."""
    keys = min(seq_len, cfg.sliding_window or seq_len)
    return 4.0 * cfg.num_layers * keys * cfg.num_heads * cfg.head_dim


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """2·P + 4·layers·K·d for one token of a `[*, seq_len]` row (see module doc)."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Global model FLOPs of one step: `student` (3× forward when training), `teacher`
    (forward), for `tokens` tokens; `total` is their sum, `attention` its QKᵀ/AV part."""

    student: float
    teacher: float
    tokens: int
    attention: float = 0.0

    @property
    def total(self) -> float:
        return self.student + self.teacher

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)


def step_flops(step: str, *, tokens: int, seq_len: int, student=None,
               teacher=None) -> StepFlops:
    """Model FLOPs of `step` ("train" | "eval" | "precompute") over `tokens` tokens.

    Args:
      student: the student `DecoderConfig` (train, eval), or None.
      teacher: the teacher `DecoderConfig` when it runs in this step (online train/eval,
        precompute), else None.
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    passes = 3.0 if step == "train" else 1.0
    with_student = student is not None and step != "precompute"
    s = passes * forward_flops_per_token(student, seq_len) * tokens if with_student else 0.0
    t = 0.0 if teacher is None else forward_flops_per_token(teacher, seq_len) * tokens
    attention = (passes * attention_flops_per_token(student, seq_len) if with_student else 0.0)
    attention += 0.0 if teacher is None else attention_flops_per_token(teacher, seq_len)
    return StepFlops(student=s, teacher=t, tokens=int(tokens), attention=attention * tokens)
