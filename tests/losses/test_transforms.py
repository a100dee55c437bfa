"""Every kind of kernel under jit, eager, vmap and shard_map over 8 (fake CPU) devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from kdjax import losses as L
from tests.tolerances import assert_close

B, T, V = 8, 3, 10  # B rows: one per fake device


def bundle(x, keys=None):
    """One call of each kind of kernel; every output has the leading batch axis."""
    s, t = x["s"], x["t"]
    calls = {
        "forward_kl": lambda: L.forward_kl(s, t, temperature=2.0),
        "jsd": lambda: L.jsd(s, t, beta=0.3),
        "adaptive_kl": lambda: L.adaptive_kl(s, t),
        "ab": lambda: L.alpha_beta_divergence(s, t, alpha=0.5, beta=0.5),
        "bucket": lambda: L.sparse_forward_kl(s, x["ids"], x["lp"], tail="bucket"),
        "sampled": lambda: L.sampled_forward_kl(s, x["sids"], x["counts"], num_samples=4),
        "hidden_cos": lambda: L.hidden_cosine(x["hs"], x["ht"], x["proj"]),
        "attention_kl": lambda: L.attention_kl(x["as"], x["at"]),
        "seq": lambda: L.sequence_logprobs(s, x["targets"], x["mask"]),
        "pro": lambda: L.pro(s[..., 0, :4], t[..., 0, :4]),
        "grad_fkl": lambda: jax.grad(lambda a: jnp.sum(L.forward_kl(a, t)))(s),
    }
    return {k: f() for k, f in calls.items() if keys is None or k in keys}


def inputs(rng):
    n = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    ids = np.argsort(rng.random((B, T, V)), -1)
    t = n(B, T, V)
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(t)), ids[..., :3], -1)
    counts = np.zeros((B, T, 4), np.int32)
    counts[..., 0], counts[..., 1] = 3, 1
    return {
        "s": n(B, T, V), "t": t, "ids": jnp.asarray(ids[..., :3]), "lp": jnp.asarray(lp),
        "sids": jnp.asarray(ids[..., 3:7]), "counts": jnp.asarray(counts),
        "hs": n(B, T, 4), "ht": n(B, T, 5), "proj": n(4, 5),
        "as": n(B, 2, T, T), "at": n(B, 2, T, T),
        "targets": jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32),
        "mask": jnp.asarray(rng.random((B, T)) < 0.7),
    }


def _assert_all_close(a, b):
    for key in b:
        assert_close(a[key], b[key], err_msg=key)


def test_jit_equals_eager_and_vmap(rng):
    x = inputs(rng)
    jitted = jax.jit(bundle)(x)
    # eager runs op by op (one compile per primitive): a few kernels keep it cheap
    _assert_all_close(jitted, bundle(x, keys=("forward_kl", "bucket", "seq")))
    per_row = {k: (None if k == "proj" else 0) for k in x}
    vmapped = jax.jit(jax.vmap(bundle, in_axes=(per_row,)))(x)
    _assert_all_close(vmapped, jitted)


def test_inside_shard_map_over_8_devices(rng):
    assert len(jax.devices()) == 8, "tests/conftest.py fakes 8 CPU devices"
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = inputs(rng)
    specs = {k: PartitionSpec() if k == "proj" else PartitionSpec("data") for k in x}
    sharded = jax.jit(jax.shard_map(bundle, mesh=mesh, in_specs=(specs,),
                                    out_specs=PartitionSpec("data")))(x)
    _assert_all_close(sharded, jax.jit(bundle)(x))
    # a token-weighted mean across shards: psum of (sum, count) equals the global reducer
    def local(v, m):
        w = L.masked_sum_count(v, m)
        return jax.lax.psum(w.sum, "data"), jax.lax.psum(w.count, "data")
    vals = sharded["forward_kl"]
    s, c = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec("data"),
                                 out_specs=PartitionSpec()))(vals, x["mask"])
    ref = L.masked_sum_count(vals, x["mask"])
    assert_close(s, ref.sum)
    assert_close(c, ref.count)
