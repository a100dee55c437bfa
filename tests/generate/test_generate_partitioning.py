"""`kdjax.models.generate` on a mesh divides its work (docs/architecture.md,
"Partitioning"), read from the compiled per-device program on 8 fake CPU devices: the
decode loop runs 1/D of the rows on each device (dot FLOPs = global/D within 15%), the
temporaries that grow with the rows (KV cache, logits) are 1/D per device, and no
collective gathers the row axis or moves a `[rows, V]` array. Values across device counts
are checked in test_generate.py; this checks the work."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import sharding as shd
from kdjax.compile import hlo
from kdjax.models import Decoder, DecoderConfig, sampler

# sizes chosen so that no model dimension equals a row count
V, ROWS, P, NEW = 320, 24, 12, 5
CFG = DecoderConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, dtype="float32")


class _Lowered(Exception):
    """Raised by the spy once the sampler's program is lowered: nothing runs."""


@functools.cache
def compiled(layout: str, temperature: float, rows: int = ROWS):
    mesh = (shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]) if layout == "one"
            else shd.make_mesh(data=8))
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(1, V, (rows, P)).astype(np.int32)
    seen = {}
    original = sampler._generate

    def spy(*args, **kwargs):  # called by `generate` inside its mesh context
        seen["lowered"] = original.lower(*args, **kwargs)
        raise _Lowered

    sampler._generate = spy
    try:
        with pytest.raises(_Lowered):
            sampler.generate(model, prompts, max_new_tokens=NEW, temperature=temperature,
                             top_k=20 if temperature else None, eos_token_id=[], mesh=mesh)
    finally:
        sampler._generate = original
    with jax.set_mesh(mesh):
        return seen["lowered"].compile()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_divides_its_rows(temperature):
    one, many = compiled("one", temperature), compiled("data8", temperature)
    text = many.as_text()
    ratio = hlo.dot_flops(text) / hlo.dot_flops(one.as_text())
    assert abs(ratio * 8 - 1) <= 0.15, f"per-device dot FLOPs are {ratio:.4f} of global"
    colls = hlo.collectives(text)
    rows = hlo.with_dim(colls, ROWS)
    assert not rows, [f"{c.kind} {list(c.operand_shape)} -> {list(c.shape)}" for c in rows]
    logits = [c for c in colls if V in c.shape]
    assert not logits, [f"{c.kind} {list(c.shape)}" for c in logits]



def test_generate_row_temporaries_are_split():
    # the CPU decode keeps a per-layer copy of the (replicated) weights in temporaries, a
    # constant; what grows with the rows is the cache and the logits: compare the growth
    def growth(layout):
        return (compiled(layout, 0.0, 2 * ROWS).memory_analysis().temp_size_in_bytes
                - compiled(layout, 0.0).memory_analysis().temp_size_in_bytes)

    ratio = growth("data8") / growth("one")
    assert abs(ratio * 8 - 1) <= 0.15, f"per-device row temporaries are {ratio:.4f} of global"
