"""What a sharded decoder compiles to on 8 fake CPU devices, traced for a TPU (the plain
forms, no CPU row views): work along the token axis is never gathered (docs/architecture.md,
"Partitioning") and the f32 master embedding table never moves, only its compute-dtype
copy. Values are checked elsewhere; XLA would give the right numbers while replicating
the batch, so these tests read the collectives."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from kdjax import platform
from kdjax.models import DecoderConfig
from kdjax.sharding import make_mesh
from tests.models.hlo import abstract_model, all_gathers, compile_with_partitioned_hlo

# sizes chosen so that no parameter dimension (or shard of one) is the batch (8) or a
# multiple of the length (28): any all-gather with such a dimension moves activations
CFG = DecoderConfig(vocab_size=160, hidden_size=48, intermediate_size=80, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True, dtype="bfloat16",
                    sliding_window=16, attention_impl="xla")
BATCH, LENGTH = 8, 28
MESHES = {"data2_fsdp4": dict(data=2, fsdp=4), "data2_fsdp2_tensor2": dict(data=2, fsdp=2,
                                                                          tensor=2)}


@pytest.mark.parametrize("layout", list(MESHES))
def test_sharded_step_moves_no_tokens_and_no_f32_table(layout):
    """A forward (logits and a requested hidden state) and backward, compiled for a TPU:
    no all-gather result has a token axis, global or per-device (compiled program: the
    CPU-only reshapes that merge batch or head axes would gather q and the attention
    logits under tensor parallelism), and the `[V, H]` tables are gathered in bf16
    (program right after SPMD partitioning: XLA:CPU later runs every bf16 collective in
    f32)."""
    mesh = make_mesh(**MESHES[layout])
    graphdef, state, tokens = abstract_model(CFG, mesh, BATCH, LENGTH)

    def loss(state, tokens):
        out = nnx.merge(graphdef, state)(tokens, hidden_layers=(1,))
        return (jnp.sum(out.logits.astype(jnp.float32) ** 2)
                + jnp.sum(out.hidden_states[1].astype(jnp.float32)))

    with platform.target("tpu"), jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss)).lower(state, tokens)
    text, partitioned = compile_with_partitioned_hlo(lowered)

    gathers = all_gathers(text)
    assert gathers, "expected the FSDP weight gathers in the compiled program"
    tokens_moved = [g for g in gathers
                    if any(d == BATCH or d % LENGTH == 0 for d in g[1])]
    assert tokens_moved == []

    v, h = CFG.vocab_size, CFG.hidden_size
    tables = [g for g in all_gathers(partitioned) if g[1] in ((v, h), (h, v))]
    assert tables, "expected the [V, H] tables to be gathered like FSDP weights"
    assert [g for g in tables if g[0] != "bf16"] == []
