"""Peer baselines for benchmarks/losses.py, written here from their published formulas.

- torch eager: materialized logits, `log_softmax` + KL (the common PyTorch recipe).
- TRL's `generalized_jsd_loss` (GKD trainer, huggingface/trl), ported to a function of
  the same shape: mixture in log space via logsumexp over a stacked pair, two `kl_div`s,
  "batchmean" reduction (here: mean over tokens).
- EasyDeL's `chunked_distillation_loss` (the JAX-native online-teacher peer): sequence
  chunks of `chunk_size` tokens scanned with the chunk body under `jax.checkpoint`, each
  chunk materializing student and teacher logits and reducing to a KL sum.
All return the mean per-token loss so that the values can be compared with kdjax's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # torch is a dev extra; the torch rows are skipped without it
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the install
    torch = None


def torch_available() -> bool:
    return torch is not None


def torch_kl_step(h, w, t, temperature=1.0):
    """fwd+bwd of mean forward KL on materialized logits; returns (loss, dh, dW)."""
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    logq = F.log_softmax((h @ w).float() / temperature, dim=-1)
    logp = F.log_softmax(t.float() / temperature, dim=-1)
    loss = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def trl_generalized_jsd(s, t, beta, temperature=1.0):
    """TRL GKDTrainer.generalized_jsd_loss (v0.x; beta weights the teacher), per token,
    without reduction: `[..., V]` student and teacher logits → `[...]`. Also the oracle of
    tests/losses/test_torch_crosscheck.py."""
    ls, lt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=ls.dtype)
        mixture = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mixture, lt, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, ls, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1)


def trl_generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """`trl_generalized_jsd` with TRL's "batchmean" reduction (here: mean over tokens)."""
    return trl_generalized_jsd(student_logits, teacher_logits, beta, temperature).mean()


def trl_jsd_step(h, w, t, beta=0.5):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss = trl_generalized_jsd_loss((h @ w).float(), t.float(), beta=beta)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def easydel_chunked_kl(h, w, h_t, w_t, *, temperature=1.0, chunk_size=128):
    """Mean forward KL, EasyDeL-style: sequence chunks, checkpointed per-chunk logits.

    h: `[N, H]`, w: `[H, V]`, h_t: `[N, H_t]`, w_t: `[H_t, V]`; N divisible by chunk_size
    (EasyDeL pads the sequence; the benchmark picks N so that no padding is needed).
    """
    n = h.shape[0]
    chunks = lambda x: x.reshape(n // chunk_size, chunk_size, x.shape[-1])

    @jax.checkpoint
    def chunk_kl(hs, ht):
        logq = jax.nn.log_softmax(jnp.dot(hs, w, preferred_element_type=jnp.float32)
                                  / temperature, axis=-1)
        t = jax.lax.stop_gradient(jnp.dot(ht, w_t, preferred_element_type=jnp.float32))
        logp = jax.nn.log_softmax(t / temperature, axis=-1)
        return jnp.sum(jnp.exp(logp) * (logp - logq))

    def body(total, xs):
        return total + chunk_kl(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(h), chunks(h_t)))
    return total / n
