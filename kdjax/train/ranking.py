"""The `ranking` objective: preference and ranking losses over K candidates per prompt.

A batch holds preference rows (`kdjax.data.preferences`): `prompt [B, P]`, `prompt_len
[B]`, `candidates [B, K, C]`, `candidate_len [B, K]`, `scores [B, K]` (higher is better),
`valid [B, K]` and, for a stored reference, `ref_logps [B, K]`. Each (prompt, candidate)
is one sequence prompt ‖ candidate (`kdjax.train.layout.completion_layout`), the student
runs once over all of them, and `fused_sequence_logprobs` gives each candidate's summed
log-prob log π(y|x) without `[N, V]` logits (÷ its length where the method averages).

Pairwise methods (dpo, ipo, simpo) train on score-ordered pairs: by default the best and
the worst valid candidate of each prompt (only those two sequences run), or with
`pairs="all"` every pair with s_i > s_j (its mean per prompt). rrhf, pro and listwise_kl
take all K. A frozen reference (dpo, ipo) is `stored` (the batch's `ref_logps`, computed
once by `precompute_reference_logps`), or `online` (a model passed as `teacher=`, run in
the step under stop_gradient). `distillm2` is DistiLLM-2's contrastive distillation with
the online teacher (`_distillm2`).

Normaliser: the loss is Weighted(Σ_prompts ℓ_i, #prompts with a usable pair), where ℓ_i
is the prompt's method loss plus `sft_weight` × the mean per-token NLL of its best
candidate (RRHF's SFT term), so every term is per prompt and the step's division by the
summed count is a mean over prompts. A prompt with fewer than 2 valid candidates, or
whose valid candidates all score the same (except listwise_kl), contributes nothing and
is counted in the "skipped" metric; it never produces NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses, sharding
from kdjax.losses.fused import TeacherHead, fused_sequence_logprobs
from kdjax.losses.reduce import Weighted
from kdjax.schema import ConfigError, check_choice
from kdjax.train.layout import completion_layout
from kdjax.train.objective import Schedule, at_step, fused_loss, merge

F32 = jnp.float32
METHODS = ("dpo", "ipo", "simpo", "rrhf", "pro", "listwise_kl", "distillm2")
PAIRWISE = ("dpo", "ipo", "simpo")
REFERENCE_METHODS = ("dpo", "ipo")
REFERENCES = ("stored", "online", "none")
PAIRS = ("best_worst", "all")
BATCH_KEYS = ("prompt", "prompt_len", "candidates", "candidate_len", "scores", "valid")
_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "distillm2": 1.0}
_AVERAGED = ("simpo", "rrhf", "pro", "listwise_kl")


@dataclasses.dataclass(frozen=True)
class RankingObjective:
    """What to minimise on preference rows; all fields static (hashable).

    Attributes:
      method: one of `METHODS`.
      beta: β of dpo/ipo/simpo (defaults 0.1, 0.1, 2.0) and of distillm2 (default 1.0; a
        schedule of the step allowed there, e.g. DistiLLM-2's 1 → 1.5 curriculum).
      gamma: SimPO's target margin γ. label_smoothing: DPO's ε in [0, 0.5].
      temperature: listwise_kl's T over candidates.
      sft_weight: weight of the SFT term (mean NLL per token of the best candidate);
        None = 1.0 for rrhf (as in RRHF), else 0. For distillm2 it is a CE term on the
        teacher's response.
      reference: "stored" | "online" | "none"; None = "stored" for dpo/ipo, "none"
        otherwise. Only dpo and ipo use a reference (and need one).
      pairs: "best_worst" or "all" (pairwise methods only).
      average: length-normalised log-probs; None = True for simpo, rrhf, pro,
        listwise_kl (as in their papers), False for dpo and ipo.
      skew_alpha: distillm2's skew α of both skew divergences.
      pad_id: written in padding slots of the sequences (never a target).
      chunk_size: token chunk of the fused kernels (None: auto).
    """

    method: str = "dpo"
    beta: float | Schedule | None = None
    gamma: float = 0.5
    label_smoothing: float = 0.0
    temperature: float = 1.0
    sft_weight: float | None = None
    reference: str | None = None
    pairs: str = "best_worst"
    average: bool | None = None
    skew_alpha: float = 0.1
    pad_id: int = 0
    chunk_size: int | None = None

    def __post_init__(self):
        check_choice(self.method, METHODS, "RankingObjective.method")
        check_choice(self.reference_mode, REFERENCES, "RankingObjective.reference")
        check_choice(self.pairs, PAIRS, "RankingObjective.pairs")
        if self.method in REFERENCE_METHODS and self.reference_mode == "none":
            raise ConfigError(f"method {self.method!r} needs a frozen reference: set "
                              "reference='stored' (precomputed ref_logps) or 'online'")
        if self.method not in REFERENCE_METHODS and self.reference_mode != "none":
            raise ConfigError(f"method {self.method!r} uses no reference, got reference="
                              f"{self.reference!r}; leave it unset (distillm2's teacher is "
                              "passed as teacher=...)")
        if self.pairs == "all" and self.method not in PAIRWISE:
            raise ConfigError(f"pairs='all' applies to {PAIRWISE}; {self.method!r} already "
                              "uses every candidate")
        if callable(self.beta) and self.method != "distillm2":
            raise ConfigError(f"a beta schedule is supported for distillm2 only, not "
                              f"{self.method!r}; give a float")
        if not callable(self.beta):
            if not float(self.beta_value) > 0:
                raise ConfigError(f"beta must be > 0, got {self.beta}")
            if self.method == "distillm2" and not float(self.beta_value) < 2:
                raise ConfigError(f"distillm2 weighs (2 − β)·SKL + β·SRKL: beta must lie in "
                                  f"(0, 2), got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"label_smoothing must lie in [0, 0.5], got "
                              f"{self.label_smoothing}")
        if not self.temperature > 0 or not self.sft >= 0 or not 0 <= self.skew_alpha < 1:
            raise ConfigError(f"need temperature > 0, sft_weight >= 0, 0 <= skew_alpha < 1; "
                              f"got {self.temperature}, {self.sft_weight}, {self.skew_alpha}")

    @property
    def beta_value(self) -> float | Schedule:
        return _BETA.get(self.method, 1.0) if self.beta is None else self.beta

    @property
    def reference_mode(self) -> str:
        if self.reference is not None:
            return self.reference
        return "stored" if self.method in REFERENCE_METHODS else "none"

    @property
    def length_average(self) -> bool:
        return self.method in _AVERAGED if self.average is None else bool(self.average)

    @property
    def sft(self) -> float:
        return (1.0 if self.method == "rrhf" else 0.0) if self.sft_weight is None else float(
            self.sft_weight)

    def projection_shapes(self, student_hidden: int, teacher_hidden: int) -> dict:
        """No learned projections (the trainer asks every objective)."""
        return {}

    @property
    def uses_teacher(self) -> bool:
        """Whether the step must pass `teacher=(graphdef, params, rest)`."""
        return self.reference_mode == "online" or self.method == "distillm2"

    def __call__(self, params: dict, batch: Mapping[str, jax.Array], *, graphdef,
                 step: jax.Array, teacher: tuple | None = None, rest=None, mesh=None
                 ) -> tuple[Weighted, dict[str, Weighted]]:
        """The loss on one (micro-)batch of preference rows (same signature as
        `kdjax.train.objective.Objective.__call__`).

        Args:
          params: `{"model": pure dict of student nnx.Params, ...}`.
          batch: the preference arrays of the module docstring (`[B, ...]`).
          graphdef, rest: the student's GraphDef and non-Param state.
          step: the optimizer step (for a distillm2 β schedule).
          teacher: `(graphdef, params, rest)` of the online reference (dpo/ipo with
            reference="online") or of the teacher (distillm2); else unused.
          mesh: the device mesh, or None; with a mesh each device computes the log-probs
            of its own sequences (`kdjax.sharding.fused_loss_axes`).

        Returns:
          `(loss, metrics)`: Weighted(Σ_prompts ℓ_i, #prompts with a pair) and Weighted
          metrics (see `ranking_terms` / `_distillm2`).
        """
        check_batch(self, batch)
        model = merge(graphdef, params["model"], rest)
        has = usable(batch["scores"], batch["valid"], tied_ok=self.method == "listwise_kl")
        if self.method == "distillm2":
            return _distillm2(self, model, batch, has, step=step, teacher=teacher, mesh=mesh)
        if self.method in PAIRWISE and self.pairs == "best_worst":
            idx = best_worst(batch["scores"], batch["valid"])
        else:
            idx = jnp.broadcast_to(jnp.arange(batch["scores"].shape[1]), batch["scores"].shape)
        pick = {k: jnp.take_along_axis(batch[k], idx, axis=1)
                for k in ("scores", "valid", "candidate_len")}
        seqs = candidate_sequences(batch, idx, self.pad_id)
        logps = sequence_logps(model, seqs, mesh=mesh, chunk_size=self.chunk_size)
        ref = self._reference(batch, idx, seqs, teacher, mesh)
        lengths = jnp.where(pick["valid"], pick["candidate_len"], 0)
        return ranking_terms(self, logps.reshape(idx.shape), ref, pick["scores"],
                             pick["valid"], lengths, has)

    def _reference(self, batch, idx, seqs, teacher, mesh):
        mode = self.reference_mode
        if mode == "none":
            return None
        if mode == "stored":
            if "ref_logps" not in batch:
                raise ValueError("reference='stored' but the batch has no 'ref_logps'; compute "
                                 "them once with precompute_reference_logps and store them "
                                 "(kdjax.data.preferences.with_reference_logps), or use "
                                 "reference='online'")
            return jnp.take_along_axis(batch["ref_logps"].astype(F32), idx, axis=1)
        if teacher is None:
            raise ValueError("reference='online' but no reference model was given; pass "
                             "teacher=(graphdef, params, rest) of the frozen reference")
        lp = sequence_logps(merge(*teacher), seqs, mesh=mesh, chunk_size=self.chunk_size)
        return jax.lax.stop_gradient(lp.reshape(idx.shape))


def check_batch(obj: RankingObjective, batch: Mapping[str, jax.Array]) -> None:
    """Raises ValueError naming a missing array or a wrong shape."""
    if missing := [k for k in BATCH_KEYS if k not in batch]:
        raise ValueError(f"the ranking objective needs preference rows; the batch lacks "
                         f"{missing} (it has {sorted(batch)}); load a preference store "
                         "(kdjax.data.preferences)")
    b, k = batch["scores"].shape[:2] if batch["scores"].ndim == 2 else (None, None)
    want = {"prompt": 2, "prompt_len": 1, "candidates": 3, "candidate_len": 2, "valid": 2}
    shapes = {n: tuple(batch[n].shape) for n in want}
    if (b is None or any(len(s) != want[n] or s[0] != b for n, s in shapes.items())
            or shapes["candidates"][1] != k or shapes["candidate_len"] != (b, k)
            or shapes["valid"] != (b, k)):
        raise ValueError(f"preference batch shapes do not fit: scores "
                         f"{tuple(batch['scores'].shape)} (want [B, K]) and {shapes} (want "
                         "prompt [B, P], prompt_len [B], candidates [B, K, C], candidate_len "
                         "and valid [B, K])")
    if k < 2:
        raise ValueError(f"{obj.method} needs K >= 2 candidate slots per prompt, got K={k}")


def usable(scores: jax.Array, valid: jax.Array, *, tied_ok: bool = False) -> jax.Array:
    """`[B]` bool: ≥ 2 valid candidates and (unless `tied_ok`) not all the same score."""
    valid = valid.astype(bool)
    hi = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(valid, scores, jnp.inf), axis=-1)
    enough = jnp.sum(valid, axis=-1) >= 2
    return enough if tied_ok else enough & (hi > lo)


def best_worst(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """`[B, 2]` int32: the best and the worst valid candidate (first index on ties)."""
    valid = valid.astype(bool)
    best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    worst = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)
    return jnp.stack([best, worst], axis=-1).astype(jnp.int32)


def candidate_sequences(batch: Mapping[str, jax.Array], idx: jax.Array, pad_id: int
                        ) -> dict[str, jax.Array]:
    """The candidates `idx [B, M]` of each prompt as sequences `[B·M, P + C]` (prompt ‖
    candidate, `completion_layout`); row b·M + m is candidate idx[b, m] of prompt b, so a
    device's prompts stay on it. Invalid candidates get length 0 (no loss tokens)."""
    b, m = idx.shape
    cand = jnp.take_along_axis(batch["candidates"], idx[:, :, None], axis=1)
    clen = jnp.take_along_axis(
        jnp.where(batch["valid"].astype(bool), batch["candidate_len"], 0), idx, axis=1)
    prompt = jnp.broadcast_to(batch["prompt"][:, None, :], (b, m, batch["prompt"].shape[1]))
    plen = jnp.broadcast_to(batch["prompt_len"][:, None], (b, m))
    return completion_layout(prompt.reshape(b * m, -1), plen.reshape(-1),
                             cand.reshape(b * m, -1), clen.reshape(-1), pad_id)


def sequence_logps(model, seqs: Mapping[str, jax.Array], *, mesh=None, chunk_size=None
                   ) -> jax.Array:
    """`[N]` f32 Σ_t loss_mask · log π(target_t) of each sequence, through the fused kernel
    (each device on its own sequences with a mesh)."""
    out = model(seqs["tokens"], segment_ids=seqs["segment_ids"], positions=seqs["positions"],
                return_logits=False)
    lm_head = model.lm_head(model.config.param_dtype)
    kw = {}
    if mesh is not None:
        axes = sharding.fused_loss_axes(mesh, *lm_head.shape)
        kw = dict(mesh=mesh, data_axis=axes["data_axis"], vocab_axis=axes["vocab_axis"])
    return fused_sequence_logprobs(out.hidden, lm_head, seqs["targets"], seqs["loss_mask"],
                                   chunk_size=chunk_size, **kw)


def _pairwise(obj, lp, ref, pair):
    """`[B, M, M]` per-pair loss of (i better than j) for dpo/ipo/simpo."""
    shape = pair.shape
    c, r = jnp.broadcast_to(lp[:, :, None], shape), jnp.broadcast_to(lp[:, None, :], shape)
    if obj.method == "simpo":
        return losses.simpo(c, r, beta=obj.beta_value, gamma=obj.gamma)
    rc, rr = jnp.broadcast_to(ref[:, :, None], shape), jnp.broadcast_to(ref[:, None, :], shape)
    if obj.method == "dpo":
        return losses.dpo(c, r, rc, rr, beta=obj.beta_value,
                          label_smoothing=obj.label_smoothing)
    return losses.ipo(c, r, rc, rr, beta=obj.beta_value)


def _method_loss(obj, lp, ref, scores, keep, pair):
    """`[B]` the method's loss per prompt (finite on every row)."""
    if obj.method in PAIRWISE:
        n = jnp.sum(pair, axis=(1, 2))
        per_pair = jnp.where(pair, _pairwise(obj, lp, ref, pair), 0.0)
        return jnp.sum(per_pair, axis=(1, 2)) / jnp.maximum(n, 1)
    if obj.method == "rrhf":
        return losses.rrhf(lp, scores, where=keep)
    if obj.method == "pro":
        return losses.pro(lp, scores, where=keep)
    live = jnp.any(keep, axis=-1, keepdims=True)  # rows without candidates: uniform, finite
    s = jnp.where(keep, lp, jnp.where(live, -jnp.inf, 0.0))
    t = jnp.where(keep, scores, jnp.where(live, -jnp.inf, 0.0))
    return losses.listwise_kl(s, t, temperature=obj.temperature)


def ranking_terms(obj: RankingObjective, logps, ref, scores, valid, lengths, has
                  ) -> tuple[Weighted, dict[str, Weighted]]:
    """Loss and metrics from per-candidate summed log-probs.

    Args:
      logps: `[B, M]` f32 Σ log π of each candidate; ref: `[B, M]` reference's, or None.
      scores, valid, lengths: `[B, M]` of the same candidates; has: `[B]` usable prompts.

    Returns:
      `(loss, metrics)`: metrics "loss", "ranking" (method term), "sft" (when weighted),
      "skipped" (Weighted(#skipped prompts, B)); over the score-ordered pairs (i better
      than j) of the usable prompts, with implicit reward r = β'·(lp − lp_ref) (β' = β
      for dpo/ipo/simpo, else 1; lp averaged where the method averages; no reference: r
      = β'·lp): "reward_accuracy" (r_i > r_j), "reward_margin" (r_i − r_j),
      "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected" (summed
      log-probs); with a reference "kl_ref" = Σ (lp − lp_ref) / Σ tokens over the valid
      candidates (the mean per-token log-ratio: a KL(π‖π_ref) estimate on on-policy
      candidates, a drift measure on offline ones).
    """
    keep = valid.astype(bool) & has[:, None]
    lp_sum = jnp.where(keep, logps, 0.0)
    n_tok = jnp.where(keep, lengths, 0).astype(F32)
    lp = lp_sum / jnp.maximum(n_tok, 1.0) if obj.length_average else lp_sum
    ref_k = None if ref is None else jnp.where(keep, ref, 0.0)
    pair = keep[:, :, None] & keep[:, None, :] & (scores[:, :, None] > scores[:, None, :])
    per_prompt = _method_loss(obj, lp, ref_k, scores, keep, pair)
    count = jnp.sum(has).astype(F32)
    metrics = {"ranking": Weighted(jnp.sum(jnp.where(has, per_prompt, 0.0)), count)}
    if obj.sft:
        best = jnp.argmax(jnp.where(keep, scores, -jnp.inf), axis=-1)[:, None]
        nll = -(jnp.take_along_axis(lp_sum, best, 1)[:, 0]
                / jnp.maximum(jnp.take_along_axis(n_tok, best, 1)[:, 0], 1.0))
        metrics["sft"] = Weighted(jnp.sum(jnp.where(has, nll, 0.0)), count)
        per_prompt = per_prompt + obj.sft * nll
    loss = Weighted(jnp.sum(jnp.where(has, per_prompt, 0.0)), count)
    metrics.update(_pair_metrics(obj, lp, lp_sum, ref_k, pair))
    if ref is not None:
        metrics["kl_ref"] = Weighted(jnp.sum(lp_sum - ref_k), jnp.sum(n_tok))
    metrics["skipped"] = Weighted(jnp.sum(~has).astype(F32), jnp.asarray(has.size, F32))
    metrics = jax.lax.stop_gradient(metrics)
    metrics["loss"] = loss
    return loss, metrics


def _pair_metrics(obj, lp, lp_sum, ref, pair) -> dict[str, Weighted]:
    scale = obj.beta_value if obj.method in PAIRWISE else 1.0
    reward = scale * (lp if ref is None else lp - ref)
    w = pair.astype(F32)
    n = jnp.sum(w)
    rc, rr = reward[:, :, None], reward[:, None, :]

    def over_pairs(x):
        return Weighted(jnp.sum(w * x), n)

    return {"reward_accuracy": over_pairs((rc > rr).astype(F32)),
            "reward_margin": over_pairs(rc - rr), "reward_chosen": over_pairs(rc),
            "reward_rejected": over_pairs(rr), "logps_chosen": over_pairs(lp_sum[:, :, None]),
            "logps_rejected": over_pairs(lp_sum[:, None, :])}


# ---------------------------------------------------------------- DistiLLM-2


def _distillm2(obj: RankingObjective, model, batch, has, *, step, teacher, mesh):
    """DistiLLM-2's contrastive distillation (Ko et al., ICML 2025, eq. for L_DistiLLM-2):

        ℓ_i = (2 − β)·mean_t SKL_α(p ‖ q)(y_t | x) + β·mean_t SRKL_α(p ‖ q)(y_s | x)

    on the teacher's response y_t (the best-scored candidate, "chosen") and the student's
    response y_s (the worst, "rejected"); SKL_α = KL(p ‖ α p + (1−α) q), SRKL_α = KL(q ‖
    α q + (1−α) p) (`kdjax.losses.skew_forward_kl` / `skew_reverse_kl`), p the online
    teacher, q the student; each sequence's per-token values are averaged over its tokens
    (as the authors' `average_log_prob=True`), so ℓ_i is per prompt like every ranking
    loss. Both terms run through `fused_distill` with a `TeacherHead`. Note: the
    authors' code detaches q inside the SRKL mixture; `skew_reverse_kl` differentiates
    it (the SRKL of DistiLLM, Ko et al. 2024), so gradients differ from theirs there.
    The authors' adaptive α (from the log-prob gaps) is not implemented: α is fixed.

    Metrics: "loss", "skew_kl_teacher", "skew_rkl_student" (per-prompt means of each
    divergence), "nll_chosen", "nll_rejected" (mean per-token NLL of each response),
    "sft" (with sft_weight: CE on the teacher's response, in the loss), "skipped".
    """
    if teacher is None:
        raise ValueError("method 'distillm2' needs the online teacher: pass teacher=("
                         "graphdef, params, rest) of the teacher model")
    idx = best_worst(batch["scores"], batch["valid"])
    seqs = candidate_sequences(batch, idx, obj.pad_id)
    hidden = model(seqs["tokens"], segment_ids=seqs["segment_ids"],
                   positions=seqs["positions"], return_logits=False).hidden
    t_model = merge(*teacher)
    t_hidden = jax.lax.stop_gradient(t_model(
        seqs["tokens"], segment_ids=seqs["segment_ids"], positions=seqs["positions"],
        return_logits=False).hidden)
    t_head = jax.lax.stop_gradient(t_model.lm_head())
    lm_head = model.lm_head(model.config.param_dtype)
    b, length = idx.shape[0], seqs["tokens"].shape[1]
    mask = seqs["loss_mask"].astype(F32).reshape(b, 2, length)
    # per-sequence token means, and nothing from unusable prompts
    w = mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0) * has[:, None, None]

    def side(x, j):  # [B·2, L, ...] → candidate j's [B·L, ...] (a slice along K: no moves)
        x = x.reshape(b, 2, length, *x.shape[2:])[:, j]
        return x.reshape(b * length, *x.shape[2:])

    beta = at_step(obj.beta_value if callable(obj.beta_value) else float(obj.beta_value),
                   step)
    loss_fn = fused_loss(mesh, lm_head)
    out = []
    for j, (div, kd_w, ce_w) in enumerate((("skew_forward_kl", 2.0 - beta, obj.sft),
                                           ("skew_reverse_kl", beta, 0.0))):
        out.append(loss_fn(side(hidden, j), lm_head, TeacherHead(side(t_hidden, j), t_head),
                           targets=side(seqs["targets"], j), mask=w[:, j].reshape(-1),
                           divergence=div, kd_weight=kd_w, ce_weight=ce_w,
                           chunk_size=obj.chunk_size, alpha=obj.skew_alpha))
    (fkl, m_t), (rkl, m_s) = out
    count = jnp.sum(has).astype(F32)
    loss = Weighted(fkl.sum + rkl.sum, count)
    metrics = {"skew_kl_teacher": Weighted(m_t["divergence"].sum, count),
               "skew_rkl_student": Weighted(m_s["divergence"].sum, count),
               "nll_chosen": Weighted(m_t["ce"].sum, count),
               "nll_rejected": Weighted(m_s["ce"].sum, count),
               "skipped": Weighted(jnp.sum(~has).astype(F32), jnp.asarray(b, F32))}
    if obj.sft:
        metrics["sft"] = metrics["nll_chosen"]
    metrics = jax.lax.stop_gradient(metrics)
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------- reference precompute


def reference_logps(graphdef, params, rest, batch: Mapping[str, jax.Array], *,
                    pad_id: int = 0, chunk_size: int | None = None, mesh=None) -> jax.Array:
    """`[B, K]` f32 summed log-probs of every candidate under a frozen model (0 for
    padding slots): what `reference="stored"` reads as `ref_logps`."""
    idx = jnp.broadcast_to(jnp.arange(batch["scores"].shape[1]), batch["scores"].shape)
    seqs = candidate_sequences(batch, idx, pad_id)
    lp = sequence_logps(merge(graphdef, params, rest), seqs, mesh=mesh, chunk_size=chunk_size)
    return jnp.where(batch["valid"].astype(bool), lp.reshape(idx.shape), 0.0)


def precompute_reference_logps(store, reference: tuple, *, batch_size: int,
                               chunk_size: int | None = None, mesh=None
                               ) -> tuple[np.ndarray, dict]:
    """The precompute pass: every row's reference log-probs, each computed exactly once.

    Args:
      store: a `PreferenceStore` (or anything with num_rows, num_candidates, pad_id and
        `read(rows)`).
      reference: `(graphdef, params, rest)` of the frozen reference (by default the
        student's starting checkpoint).
      batch_size: rows per forward (the last batch is padded by repeating its rows; with
        a mesh, a multiple of the data-parallel size).
      chunk_size: token chunk of the fused kernel; mesh: shard rows over its batch axes.

    Returns:
      `(ref_logps [num_rows, K] float32, {"rows", "forwards", "sequences"})`: forwards
      counts the jitted reference calls, sequences the valid candidates scored. Store
      them with `kdjax.data.preferences.with_reference_logps`.
    """
    graphdef, params, rest = reference
    fn = jax.jit(lambda p, r, b: reference_logps(graphdef, p, r, b, pad_id=store.pad_id,
                                                 chunk_size=chunk_size, mesh=mesh))
    put = (lambda x: x) if mesh is None else (lambda x: jax.device_put(
        x, jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh=mesh))))
    n = store.num_rows
    out = np.zeros((n, store.num_candidates), np.float32)
    forwards = sequences = 0
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, min(lo + batch_size, n))
        padded = np.resize(rows, batch_size)  # fixed shapes: one compile
        data = store.read(padded)
        got = fn(params, rest, {k: put(data[k]) for k in BATCH_KEYS})
        out[rows] = np.asarray(got)[:len(rows)]
        forwards += 1
        sequences += int(data["valid"][:len(rows)].sum())
    return out, {"rows": n, "forwards": forwards, "sequences": sequences}
