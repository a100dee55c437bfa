"""float64 NumPy references written directly from docs/losses.md's formulas (probabilities).

Independent of kdjax's log-space code paths on purpose: mixtures are formed as
probabilities, limits of the AB-divergence are not used here (see the tests).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def f64(x) -> np.ndarray:
    """The exact values a kernel sees (bf16 inputs rounded first), as float64."""
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def softmax(x, temperature=1.0):
    x = f64(x) / temperature
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


def xlogy_ratio(a, b):
    """Σ a log(a/b) with 0 log 0 = 0, over the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a > 0, a * (np.log(np.where(a > 0, a, 1.0)) - np.log(b)), 0.0)
    return t.sum(-1)


def kl(p, q):
    return xlogy_ratio(p, q)


def dense(name, s, t, temperature=1.0, **kw):
    p, q = softmax(t, temperature), softmax(s, temperature)
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        b = kw.get("beta", 0.5)
        if b in (0.0, 1.0):  # the GKD/TRL convention: the ends are the plain KLs
            return kl(p, q) if b == 0.0 else kl(q, p)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skew_forward_kl":
        a = kw.get("alpha", 0.1)
        return kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return kl(q, a * q + (1 - a) * p)
    if name == "soft_cross_entropy":
        return -(p * np.log(q)).sum(-1)
    if name == "alpha_beta_divergence":
        return ab_general(p, q, kw["alpha"], kw["beta"])
    if name == "adaptive_kl":
        return akl(p, q, kw.get("mu", 0.5))
    raise KeyError(name)


def ab_general(p, q, a, b):
    s = a + b
    return -(p**a * q**b - a / s * p**s - b / s * q**s).sum(-1) / (a * b)


def akl(p, q, mu):
    """AKL (Wu et al., 2024), written per row with explicit loops over the sorted vocab."""
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        pr, qr = p[idx], q[idx]
        order = sorted(range(len(pr)), key=lambda i: (-pr[i], i))
        head, mass = [], 0.0
        for i in order:  # smallest prefix whose mass reaches mu
            if mass >= mu:
                break
            head.append(i)
            mass += pr[i]
        in_head = np.zeros(len(pr), bool)
        in_head[head] = True
        g_h = np.abs(pr - qr)[in_head].sum()
        g_t = np.abs(pr - qr)[~in_head].sum()
        fkl, rkl = kl(pr, qr), kl(qr, pr)
        out[idx] = 0.0 if g_h + g_t == 0 else (g_h * fkl + g_t * rkl) / (g_h + g_t)
    return out


def cross_entropy(s, targets):
    q = softmax(s)
    return -np.log(np.take_along_axis(q, np.asarray(targets)[..., None], -1)[..., 0])


def sparse_fkl(s, ids, logprobs, tail):
    q = softmax(s)
    ids = np.asarray(ids)
    q_ids = np.take_along_axis(q, ids, -1)
    p = np.exp(f64(logprobs))
    if tail == "renormalize":
        pt = p / p.sum(-1, keepdims=True)
        return kl(pt, q_ids)
    p_r = np.clip(1.0 - p.sum(-1), 0.0, None)
    in_ids = np.zeros(q.shape, bool)
    np.put_along_axis(in_ids, ids, True, -1)
    q_r = np.where(in_ids, 0.0, q).sum(-1)  # exact complement mass
    with np.errstate(divide="ignore", invalid="ignore"):
        bucket = np.where(p_r > 0, p_r * (np.log(np.where(p_r > 0, p_r, 1)) - np.log(q_r)), 0.0)
    return kl(p, q_ids) + bucket


def sampled_fkl(s, ids, counts, n):
    q_ids = np.take_along_axis(softmax(s), np.asarray(ids), -1)
    t = np.asarray(counts, np.float64) / n
    return kl(t, q_ids)


def log_softmax(x):
    x = f64(x)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def sigmoid_log(x):
    return -np.logaddexp(0.0, -x)
