"""The train step: jitted once and pure, token-weighted accumulation, mesh layouts, guard.

Layout tolerance: the same 3 steps on 1 device and on 8 fake devices (data=8,
data=2×tensor=4, fsdp=8) give losses equal to rtol 1e-5 and parameters to atol 2e-5
(f32; only the order of the cross-device sums differs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from kdjax import sharding as shd
from kdjax.models import Decoder, DecoderConfig
from kdjax.train.config import OptimizerConfig
from kdjax.train.objective import Objective
from kdjax.train.state import create_train_state
from kdjax.train.step import make_train_step
from tests.tolerances import assert_close

V, B, L = 32, 8, 8
CFG = DecoderConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_layers=1,
                    num_heads=8, num_kv_heads=4)
OBJ = Objective(alpha=0.5, temperature=2.0, t2_scaling=True,
                store_manifest=(("mode", "sampled"), ("num_samples", 8)))
DENSE = Objective(alpha=0.5, store_manifest=(("mode", "dense"),))
OPT, STEPS = OptimizerConfig(lr=1e-2, warmup_steps=1), 10


def _batches(rng, n, nan_at=()):
    out = []
    for i in range(n):
        toks = rng.integers(0, V, (B, L + 1)).astype(np.int32)
        mask = rng.random((B, L)) > 0.3
        mask[0] = False  # an empty row: weighting must be by tokens, not rows
        counts = rng.multinomial(8, np.full(4, 0.25), size=(B, L)).astype(np.int32)
        b = dict(tokens=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask,
                 segment_ids=np.ones((B, L), np.int32),
                 positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
                 teacher_ids=rng.integers(0, V, (B, L, 4)).astype(np.int32),
                 teacher_counts=counts,
                 teacher_logits=rng.normal(0, 1, (B, L, V)).astype(np.float32))
        if i in nan_at:
            b["teacher_logits"][1, 2, 3] = np.nan  # one bad teacher logit poisons the loss
        out.append(b)
    return out


def _run(mesh, batches, *, micro=1, opt=OPT, obj=OBJ, history=None):
    """Trains on `batches`; returns (state, per-step metrics, the step function)."""
    tx = opt.build(STEPS)
    state = create_train_state(Decoder(CFG, rngs=nnx.Rngs(0)), tx, mesh=mesh, seed=0)
    sharding = NamedSharding(mesh, shd.logical_to_spec(("batch",), mesh=mesh))
    step = make_train_step(obj, tx, state=state, mesh=mesh, batch_sharding=sharding,
                           micro_batches=micro, lr_schedule=opt.schedule(STEPS))
    step.put = lambda b: {k: jax.device_put(v, sharding) for k, v in b.items()}
    metrics = []
    with jax.set_mesh(mesh):
        for b in batches:
            if history is not None:
                history.append(jax.device_get(state))
            state, m = step(state, step.put(b))
            metrics.append(jax.device_get(m))
    return state, metrics, step


@pytest.fixture(scope="module")
def one_device():
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batches = _batches(np.random.default_rng(0), 3)
    state, metrics, step = _run(mesh, batches)
    return batches, jax.device_get(state.params), metrics, step


def test_step_is_jitted_once_and_advances(one_device):
    _, _, metrics, step = one_device
    assert step.jitted._cache_size() == 1
    assert [int(m["skipped"]) for m in metrics] == [0, 0, 0]
    assert metrics[0]["learning_rate"] == 0.0 and metrics[1]["learning_rate"] > 0


def test_step_is_pure(one_device):
    batches, params, metrics, step = one_device
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    history = []
    live, _, _ = _run(mesh, batches[:2], history=history)
    shardings = jax.tree.map(lambda x: x.sharding, live)
    with jax.set_mesh(mesh):  # the state before step 2, replayed twice through one step
        outs = [step(jax.device_put(history[1], shardings), step.put(batches[1]))
                for _ in range(2)]
    (a, ma), (b, mb) = jax.device_get(outs)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert float(ma["loss"].sum) == float(mb["loss"].sum) == float(metrics[1]["loss"].sum)
    assert step.jitted._cache_size() == 1


def test_accumulation_equals_one_big_batch(one_device):
    batches, params, metrics, _ = one_device
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, acc_metrics, _ = _run(mesh, batches, micro=4)
    for m1, m4 in zip(metrics, acc_metrics):
        assert float(m1["loss"].count) == float(m4["loss"].count)
        assert_close(m4["loss"].mean(), float(m1["loss"].mean()), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", [(8, 1, 1), (2, 1, 4), (1, 8, 1)],
                         ids=["data8", "data2_tensor4", "fsdp8"])
def test_same_losses_on_8_devices(one_device, layout):
    batches, params, metrics, _ = one_device
    mesh = shd.make_mesh(*layout)
    state, multi, _ = _run(mesh, batches)
    for a, b in zip(multi, metrics):
        assert_close(a["loss"].mean(), float(b["loss"].mean()), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        assert_close(x, y, atol=2e-5, rtol=1e-4)
    emb = state.params["model"]["embed"].sharding.spec  # params stay sharded
    assert emb == shd.logical_to_spec(("vocab", "embed"), mesh=mesh)


def test_nonfinite_update_is_skipped_and_counted(rng):
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    history = []
    state, metrics, _ = _run(mesh, _batches(rng, 4, nan_at=(1, 2)), obj=DENSE,
                             history=history)
    assert [int(m["skipped"]) for m in metrics] == [0, 1, 1, 0]
    assert [int(m["nonfinite"]) for m in metrics] == [0, 1, 2, 0]
    assert int(state.nonfinite_total) == 2 and int(state.step) == 4
    for x, y in zip(jax.tree.leaves(history[3].params), jax.tree.leaves(history[1].params)):
        np.testing.assert_array_equal(x, y)  # the two NaN steps changed nothing
    assert not np.array_equal(jax.device_get(state.params["model"]["embed"]),
                              history[3].params["model"]["embed"])  # and then it learns


def test_indivisible_micro_batches_is_a_clear_error(rng):
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="micro_batches=3"):
        _run(mesh, _batches(rng, 1), micro=3)


def test_optimizer_schedule_warmup_then_cosine():
    sched = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1).schedule(20)
    lrs = np.array([float(sched(jnp.int32(s))) for s in range(21)])
    np.testing.assert_allclose(lrs[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    assert np.all(np.diff(lrs[4:]) <= 1e-7) and abs(lrs[20] - 0.1) < 1e-6


def test_weight_decay_skips_stacked_norms_and_decays_projections():
    """AdamW decays matrices only: the stacked layers' norm scales are `[layers, H]` (2-D)
    and must not decay; learned hidden-state projections must."""
    from kdjax.train.state import decay_mask

    params = {"model": nnx.to_pure_dict(nnx.state(Decoder(CFG, rngs=nnx.Rngs(0)), nnx.Param)),
              "proj": {"0_1": jnp.ones((4, 4))}}
    mask = decay_mask(params)
    layers = mask["model"]["layers"]
    assert params["model"]["layers"]["attn_norm"]["scale"].ndim == 2
    assert layers["attn_norm"]["scale"] is False and layers["mlp"]["up"]["kernel"] is True
    assert mask["model"]["embed"] is True and mask["proj"]["0_1"] is True
