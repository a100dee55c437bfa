"""kdjax.sharding: the mesh, the logical-axis rule table, activation constraints and
parameter shardings from logical names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax import sharding


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.data_parallel_size(mesh) == 4
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.make_mesh(data=-1, tensor=3)
    with pytest.raises(ValueError, match="8 are available"):
        sharding.make_mesh(data=2, fsdp=1, tensor=1)


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("batch", "length", "embed"), mesh=mesh) == P(
        ("data", "fsdp"), None, None)  # fsdp already used by batch
    assert sharding.logical_to_spec(("embed", "vocab"), mesh=mesh) == P("fsdp", "tensor")
    small = sharding.make_mesh(data=8, fsdp=1, tensor=1)
    assert sharding.logical_to_spec(("embed", "mlp"), mesh=small) == P(None, None)
    # 2 kv heads cannot split 4 ways: that dimension stays replicated
    tp4 = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    assert sharding.logical_to_spec(("embed", "kv_heads"), mesh=tp4, shape=(64, 2)) == P(
        None, None)
    assert sharding.logical_to_spec(("batch", "kv_heads"), mesh=tp4, shape=(6, 8)) == P(
        "data", "tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        sharding.logical_to_spec(("embd",))


def test_constrain_is_identity_without_mesh_and_shards_with_one():
    x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    assert sharding.constrain(x, ("batch", "embed")) is x
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "mlp")))(x)
    assert y.sharding.spec == P("data", "tensor")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    with pytest.raises(ValueError, match="2 logical axes"), jax.set_mesh(mesh):
        sharding.constrain(jnp.ones(3), ("batch", "embed"))


def test_state_shardings_and_shard_model():
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "vocab"),
                               eager_sharding=False)
            self.b = nnx.Param(jnp.ones((8,)))  # no names: replicated

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = sharding.shard_model(Tiny(), mesh)
    assert model.w[...].sharding.spec == P("fsdp", "tensor")
    assert model.b[...].sharding.spec == P(None)
    assert sharding.variable_logical_axes(model.w) == ("embed", "vocab")
