"""from_pretrained / save_pretrained: sharded safetensors with an index, loading onto a
mesh, dtypes, and bad checkpoints failing with messages that name the tensor/option."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models import from_pretrained, save_pretrained
from kdjax.models.safetensors_io import INDEX, open_tensors, write_tensors
from kdjax.sharding import logical_to_spec, make_mesh, variable_logical_axes
from tests.models.conftest import VOCAB
from tests.tolerances import assert_close


def _rewrite(src, dst, edit):
    """Copies checkpoint `src` to `dst`, passing its tensors through `edit(dict)`."""
    shutil.copytree(src, dst)
    tensors = {k: np.asarray(v) for k, v in open_tensors(src).items()}
    for f in dst.glob("*.safetensors"):
        f.unlink()
    tensors = edit(tensors)
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_tensors(dst, specs, tensors.__getitem__)
    return dst


def _same_params(a, b):
    flat_a = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    flat_b = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key].get_value()),
                                      np.asarray(flat_b[key].get_value()), err_msg=str(key))


def test_sharded_checkpoint_with_index_round_trips(families, tmp_path):
    fam = families("llama")
    save_pretrained(fam.model, tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / INDEX).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    _same_params(from_pretrained(tmp_path), fam.model)


def test_load_onto_mesh_shards_every_param_by_logical_axes(families):
    fam = families("llama")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(fam.path, mesh=mesh)
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        axes = variable_logical_axes(var)
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert var.get_value().sharding.spec == logical_to_spec(axes, mesh=mesh), path
    assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    _same_params(sharded, fam.model)


def test_mesh_axes_that_do_not_divide_a_dim_replicate_it(families):
    fam = families("llama")  # 4 query heads, 2 kv heads
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    sharded = from_pretrained(fam.path, mesh=mesh)
    attn = sharded.layers.attn  # stacked: [layers, H, heads, head_dim]
    P = jax.sharding.PartitionSpec
    assert attn.q.kernel[...].sharding.spec == P(None, None, "tensor", None)
    assert attn.k.kernel[...].sharding.spec == P(None, None, None, None)
    _same_params(sharded, fam.model)


def test_bf16_param_dtype_and_bf16_export(families, tmp_path, rng):
    fam = families("qwen3")
    model = from_pretrained(fam.path, param_dtype="bfloat16", dtype="bfloat16")
    assert model.layers.attn.q.kernel[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(rng.integers(3, VOCAB, (1, 6)), jnp.int32)
    out = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert out.logits.dtype == jnp.bfloat16
    ref = fam.torch_logits(np.asarray(tokens)).logits.numpy()
    assert_close(out.logits.astype(jnp.float32), ref, rtol=0, atol=0.1)
    save_pretrained(fam.model, tmp_path, dtype="bfloat16")
    raw = open_tensors(tmp_path)["model.embed_tokens.weight"]
    assert raw.dtype.name == "bfloat16"
    f32 = from_pretrained(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(f32.embed[...]),
        np.asarray(fam.model.embed[...].astype(jnp.bfloat16).astype(jnp.float32)))


def test_missing_tensor_is_named(families, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(families("llama").path, tmp_path / "bad",
                   lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        from_pretrained(bad)


def test_wrong_shape_is_named(families, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _rewrite(families("llama").path, tmp_path / "bad",
                   lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(ValueError, match=rf"{name}.*shape \(15, 32\).*\(16, 32\)"):
        from_pretrained(bad)


def test_unexpected_tensor_is_named(families, tmp_path):
    bad = _rewrite(families("llama").path, tmp_path / "bad",
                   lambda t: {**t, "model.layers.0.mlp.gate_proj.bias": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate_proj.bias"):
        from_pretrained(bad)


def test_truncated_file_is_refused(families, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(families("llama").path, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_pretrained(bad)


def test_unknown_architecture_and_missing_files(families, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(families("llama").path, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2",
                                                 "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
