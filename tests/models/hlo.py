"""Helpers for tests that check what a sharded model compiles to: abstract (sharded)
inputs for ahead-of-time lowering, and the collectives of an HLO text."""

from __future__ import annotations

import glob
import re
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import Decoder
from kdjax.sharding import named_sharding, state_shardings

_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")


def abstract_model(cfg, mesh, batch: int, length: int):
    """`(graphdef, state, tokens)`: the model's state and a `[batch, length]` token batch
    as ShapeDtypeStructs placed on `mesh` by their logical axes (nothing allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, shardings)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                  sharding=named_sharding(mesh, ("batch", "length")))
    return graphdef, state, tokens


def collectives(text: str, kind: str | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """`(op, dtype, result shape)` of every collective in an HLO text (or only `kind`)."""
    out = []
    for dtype, dims, op in _COLLECTIVE.findall(text):
        if kind is None or op == kind:
            out.append((op, dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def all_gathers(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """`(dtype, result shape)` of every all-gather in an HLO text."""
    return [(dtype, shape) for _, dtype, shape in collectives(text, "all-gather")]


def compile_with_partitioned_hlo(lowered) -> tuple[str, str]:
    """`(compiled HLO text, HLO text right after SPMD partitioning)`.

    The second is what the partitioner decided to move, in the program's own dtypes:
    XLA:CPU later runs bf16 collectives in f32 (and folds the converts around them), so
    on CPU only this view tells a bf16 gather from an f32 one."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = lowered.compile(compiler_options={
            "xla_dump_to": tmp, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        (path,) = glob.glob(f"{tmp}/*after_spmd-partitioning*")
        with open(path) as f:
            partitioned = f.read()
    return compiled.as_text(), partitioned
