"""Independent cross-check: the formulas ported to torch (TRL's generalized JSD and DPO).

torch computes in float64 on the same (f32) inputs; values and student gradients agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.losses_baselines import trl_generalized_jsd  # TRL's formula, ported
from kdjax import losses as L
from tests.tolerances import TOL, assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_forward_kl(s, t, temperature):
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(p‖q)


def torch_reverse_kl(s, t, temperature):
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(q‖p)


def trl_dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing):
    logits = (pc - pr) - (rc - rr)
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


CASES = [  # (name, torch fn, kdjax fn, kwargs)
    ("forward_kl", torch_forward_kl, L.forward_kl, {}),
    ("reverse_kl", torch_reverse_kl, L.reverse_kl, {}),
] + [(f"jsd_{b}", lambda s, t, T, b=b: trl_generalized_jsd(s, t, b, T), L.jsd, {"beta": b})
     for b in (0.0, 0.1, 0.5, 0.9, 1.0)]


@jax.jit
def kdjax_all(s, t, temperature):
    out = {}
    for name, _, fn, kw in CASES:
        f = lambda a, fn=fn, kw=kw: fn(a, t, temperature=temperature, **kw)
        out[name] = (f(s), jax.grad(lambda a, f=f: jnp.sum(f(a)))(s))
    return out


def test_divergences_match_torch(rng):
    for shape, temperature in (((4, 11), 1.0), ((4, 11), 2.0), ((2, 3, 11), 1.0)):
        s = jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
        t = jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
        outs = kdjax_all(s, t, temperature)
        for name, torch_fn, _, _ in CASES:
            ts = torch.tensor(np.asarray(s), dtype=torch.float64, requires_grad=True)
            tt = torch.tensor(np.asarray(t), dtype=torch.float64)
            val = torch_fn(ts, tt, temperature)
            val.sum().backward()
            out, grad = outs[name]
            assert_close(out, val.detach().numpy(), err_msg=name)
            assert_close(grad, ts.grad.numpy(), "float32", **TOL["grad"], err_msg=name)


def test_dpo_matches_torch(rng):
    pc, pr, rc, rr = (rng.normal(size=(3, 4)).astype(np.float32) * 5 for _ in range(4))
    f = jax.jit(lambda *a: L.dpo(*a, beta=0.2, label_smoothing=0.1))
    out = f(*(jnp.asarray(a) for a in (pc, pr, rc, rr)))
    ref = trl_dpo_sigmoid(*(torch.tensor(a, dtype=torch.float64) for a in (pc, pr, rc, rr)),
                          0.2, 0.1)
    assert_close(out, ref.numpy())
