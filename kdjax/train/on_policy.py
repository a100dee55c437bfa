"""On-policy distillation inside the train step: GKD, on-policy reverse KL, MiniLLM.

Per micro-batch of example rows (`prompt`, `prompt_len`, optional dataset `completion`,
`completion_len`, `example_id`), before the gradient:

1. every example gets a key `fold_in(fold_in(state.rng, step), example_id)`, so what it
   samples depends on neither its micro-batch, device nor host, and a resumed run
   samples again exactly what it sampled the first time;
2. with probability λ (`fraction`, drawn from that key) its completion is sampled by
   `kdjax.models.rollout` from the *current* student parameters (or the teacher, or
   their mixture), at fixed shapes `[B, P] → [B, P + W]`, inside the jitted step;
   the others keep their dataset completion (`jnp.where`: same program for any λ);
3. prompt ‖ completion is laid out once (`kdjax.train.layout`, the one causal shift).

The loss is then taken on completion tokens, with the online teacher under
stop_gradient and no gradient through the sampling:

- `gkd`: the distillation `Objective` (any catalog divergence through the fused kernel,
  `TeacherHead`) on the laid-out rows: λ = 0 is exactly offline KD on the dataset's
  completions;
- `rkl_reward`: r_t = log p(y_t) − log q_old(y_t), A_t = Σ_{t'≥t} γ^{t'−t} r_{t'} under
  stop_gradient, loss −Σ_t A_t·ρ_t with ρ_t = q_θ/q_old (optionally PPO-clipped);
- `minillm`: the exact single-step term Σ_t w_t·KL(q_θ(·|y<t) ‖ p(·|y<t)) through the
  fused kernel plus the policy-gradient term on length-normalised long-term rewards
  (`kdjax.losses.on_policy.minillm_policy_loss`), w_t the teacher-mixed importance
  weights (1 without mixing).

log q_old is the sampler's log-probability of each sampled token (temperature 1,
raw logits); for rows that kept their dataset completion it is stop_gradient(log q_θ).
Every term is a `Weighted(sum, count)` over completion tokens, so the step divides once
by the completion-token count of the whole step (all micro-batches, all hosts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from kdjax.losses.reduce import Weighted
from kdjax.train.layout import completion_layout, completion_mask, to_completion
from kdjax.train.objective import Objective, fused_loss, merge

EXAMPLE_KEYS = ("prompt", "prompt_len", "example_id")


@dataclasses.dataclass(frozen=True)
class OnPolicyObjective:
    """What the step minimises on sampled completions; all fields static.

    Attributes:
      base: the distillation objective on laid-out rows (gkd: its divergence; minillm:
        reverse_kl, the single-step term); teacher_source "online".
      loss: "gkd" | "rkl_reward" | "minillm".
      fraction: λ, the probability that an example's completion is sampled.
      source: "student" | "teacher" | "mixed" (MiniLLM's α·p + (1 − α)·q).
      mix_alpha: α of the mixture.
      max_new_tokens, temperature, top_k, top_p: sampling settings (temperature is the
        sampling one, separate from the loss temperature of `base`).
      stop_ids: ids that end a completion (the student's eos included).
      pad_id: id of padding slots.
      gamma: discount of the advantages; clip_eps: PPO clip ε or None.
      updates_per_rollout: optimizer updates on each rollout (MiniLLM/PPO reuse; the
        step does them all, see `kdjax.train.step`).
    """

    base: Objective
    loss: str = "gkd"
    fraction: float = 1.0
    source: str = "student"
    mix_alpha: float = 0.2
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    gamma: float = 0.0
    clip_eps: float | None = None
    updates_per_rollout: int = 1

    @property
    def teacher_source(self) -> str:
        return "online"

    def projection_shapes(self, student_hidden: int, teacher_hidden: int) -> dict:
        return self.base.projection_shapes(student_hidden, teacher_hidden)

    # ------------------------------------------------------------------ rollout
    def prepare(self, params: dict, batch: Mapping[str, jax.Array], *, graphdef, rest,
                rng: jax.Array, step: jax.Array, teacher: tuple | None) -> dict:
        """Samples the completions of one micro-batch and lays the rows out.

        Runs outside the gradient, from the current params. Returns the laid-out batch
        (`tokens, targets, loss_mask, segment_ids, positions [B, P + W]`) plus
        `completion_len [B]`, `prompt_len [B]`, `sampled [B]` bool, `logq_old [B, W]`,
        `log_weights [B, W]` (teacher-mixed importance weights, 0 otherwise) and the
        rollout's `finished [B]`.
        """
        from kdjax.models.rollout import rollout

        missing = [k for k in EXAMPLE_KEYS if k not in batch]
        if missing:
            raise ValueError(f"on-policy training reads example rows, but the batch has no "
                             f"{missing}; pack the data with `kdjax pack --layout examples`")
        prompt, plen = batch["prompt"], batch["prompt_len"]
        has_data = "completion" in batch
        width = max(self.max_new_tokens, batch["completion"].shape[1] if has_data else 0)
        base_key = jax.random.fold_in(rng, step)
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
            batch["example_id"].astype(jnp.uint32))
        if self.fraction >= 1.0 or not has_data:
            sampled = jnp.ones(prompt.shape[:1], bool)
        elif self.fraction <= 0.0:
            sampled = jnp.zeros(prompt.shape[:1], bool)
        else:
            sampled = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))
                               )(keys) < self.fraction
        if teacher is None and self.source != "student":
            raise ValueError(f"on_policy.source={self.source!r} needs the online teacher")

        def widen(x, fill):
            return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)

        if has_data and self.fraction <= 0.0:  # known when tracing: no rollout at all
            zeros = jnp.zeros((prompt.shape[0], width), jnp.float32)
            laid = completion_layout(prompt, plen, widen(batch["completion"], self.pad_id),
                                     batch["completion_len"], self.pad_id)
            laid.update(prompt_len=plen, completion_len=batch["completion_len"],
                        sampled=sampled, student_sampled=sampled, logq_old=zeros,
                        log_weights=zeros, finished=sampled,
                        rollout_len=jnp.zeros_like(batch["completion_len"]))
            return laid
        student = (graphdef, params["model"], rest)
        sampler = teacher if self.source == "teacher" else student
        out = rollout(sampler, prompt, plen,
                      jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                      max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                      top_k=self.top_k, top_p=self.top_p, stop_ids=self.stop_ids,
                      pad_id=self.pad_id,
                      teacher=teacher if self.source == "mixed" else None,
                      mix_alpha=self.mix_alpha if self.source == "mixed" else None)

        tokens, lengths = widen(out.tokens, self.pad_id), out.lengths
        logq_old = widen(out.logprobs.astype(jnp.float32), 0.0)
        log_w = jnp.zeros_like(logq_old)
        if self.source == "mixed":
            log_w = widen((out.logprobs - out.sample_logprobs).astype(jnp.float32), 0.0)
        if self.source == "teacher":  # the student did not sample: no q_old to ratio against
            sampled_by_student = jnp.zeros_like(sampled)
        else:
            sampled_by_student = sampled
        if has_data:
            comp = jnp.where(sampled[:, None], tokens, widen(batch["completion"], self.pad_id))
            clen = jnp.where(sampled, lengths, batch["completion_len"])
        else:
            comp, clen = tokens, lengths
        laid = completion_layout(prompt, plen, comp, clen, self.pad_id)
        laid.update(prompt_len=plen, completion_len=clen, sampled=sampled,
                    student_sampled=sampled_by_student, logq_old=logq_old,
                    log_weights=jnp.where(sampled[:, None], log_w, 0.0),
                    finished=out.finished, rollout_len=lengths)
        return laid

    # ------------------------------------------------------------------ loss
    def __call__(self, params: dict, batch: Mapping[str, jax.Array], *, graphdef,
                 step: jax.Array, teacher: tuple | None = None, rest=None, mesh=None
                 ) -> tuple[Weighted, dict[str, Weighted]]:
        """The loss on one prepared micro-batch (see `prepare`)."""
        if self.loss == "gkd":
            loss, metrics = self.base(params, batch, graphdef=graphdef, step=step,
                                      teacher=teacher, rest=rest, mesh=mesh)
        else:
            loss, metrics = self._policy_gradient(params, batch, graphdef=graphdef,
                                                  teacher=teacher, rest=rest, mesh=mesh,
                                                  step=step)
            metrics["loss"] = loss
        metrics.update(self._rollout_metrics(batch))
        return loss, metrics

    def _policy_gradient(self, params, batch, *, graphdef, teacher, rest, mesh, step):
        from kdjax.losses import on_policy as opl

        if teacher is None:
            raise ValueError(f"on-policy loss {self.loss!r} needs the online teacher")
        model = merge(graphdef, params["model"], rest)
        out = model(batch["tokens"], segment_ids=batch["segment_ids"],
                    positions=batch["positions"], return_logits=False)
        t_model = merge(*teacher)
        t_hidden = jax.lax.stop_gradient(t_model(
            batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
            return_logits=False).hidden)
        t_head = jax.lax.stop_gradient(t_model.lm_head())
        lm_head = model.lm_head(model.config.param_dtype)
        width = batch["logq_old"].shape[1]
        logq = to_completion(token_logprobs(out.hidden, lm_head, batch["targets"], mesh),
                             batch["prompt_len"], width)
        logp = to_completion(token_logprobs(t_hidden, t_head, batch["targets"], mesh),
                             batch["prompt_len"], width)
        logp = jax.lax.stop_gradient(logp)
        mask = completion_mask(batch["completion_len"], width)
        logq_old = jnp.where(batch["student_sampled"][:, None], batch["logq_old"],
                             jax.lax.stop_gradient(logq))
        metrics = {"reward": _masked(logp - logq_old, mask)}
        if self.loss == "rkl_reward":
            loss = opl.rkl_reward_loss(logq, logq_old, logp, mask, gamma=self.gamma,
                                       clip_eps=self.clip_eps)
            metrics["policy"] = loss
            return loss, metrics
        # minillm: the policy term on long-term rewards + the exact single-step term
        weights = jnp.exp(batch["log_weights"])
        policy = opl.minillm_policy_loss(logq, logq_old, logp, mask, gamma=self.gamma,
                                         clip_eps=self.clip_eps, weights=weights)
        token_w = _to_slots(weights * mask, batch["prompt_len"], batch["tokens"].shape[1])
        from kdjax.losses import fused

        single, _ = fused_loss(mesh, lm_head)(
            _flat(out.hidden), lm_head, fused.TeacherHead(_flat(t_hidden), t_head),
            mask=_flat(token_w), divergence="reverse_kl", kd_weight=1.0,
            chunk_size=self.base.chunk_size)
        single = Weighted(single.sum, policy.count)  # one normaliser: completion tokens
        metrics.update(policy=policy, single_step=single)
        return Weighted(policy.sum + single.sum, policy.count), metrics

    def _rollout_metrics(self, batch) -> dict[str, Weighted]:
        sampled = batch["sampled"].astype(jnp.float32)
        n = jnp.sum(sampled)
        return {
            "on_policy_fraction": Weighted(n, jnp.float32(sampled.shape[0])),
            "completion_len": Weighted(jnp.sum(batch["rollout_len"] * sampled), n),
            "finished": Weighted(jnp.sum(batch["finished"] * sampled), n),
        }


def token_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, mesh=None
                   ) -> jax.Array:
    """`[B, L]` log softmax(hidden @ lm_head)[targets] per token, through the fused
    sequence kernel (each token its own length-1 "sequence": no `[B, L, V]` logits)."""
    from kdjax import sharding
    from kdjax.losses.fused import fused_sequence_logprobs

    b, length, h = hidden.shape
    kw = {}
    if mesh is not None:
        axes = sharding.fused_loss_axes(mesh, h, lm_head.shape[1])
        kw = dict(mesh=mesh, data_axis=axes["data_axis"], vocab_axis=axes["vocab_axis"])
    lp = fused_sequence_logprobs(hidden.reshape(b * length, 1, h), lm_head,
                                 targets.reshape(b * length, 1), **kw)
    return lp.reshape(b, length)


def _masked(values: jax.Array, mask: jax.Array) -> Weighted:
    m = mask.astype(jnp.float32)
    return Weighted(jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(m))


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _to_slots(values: jax.Array, prompt_len: jax.Array, length: int) -> jax.Array:
    """Per-completion-token values `[B, W]` → per-slot `[B, L]` (at the slot predicting
    each token; 0 elsewhere): the inverse of `layout.to_completion`."""
    b, w = values.shape
    slots = prompt_len.astype(jnp.int32)[:, None] - 1 + jnp.arange(w, dtype=jnp.int32)[None]
    out = jnp.zeros((b, length + w), values.dtype)  # room for slots past the row
    out = out.at[jnp.arange(b)[:, None], slots].add(values)
    return out[:, :length]
