"""kdjax.compile.hlo on hand-written HLO and on programs compiled for 8 CPU devices / TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.compile import hlo

# lines wrapped for ruff's line length are joined before parsing (XLA prints one per line)
TEXT = """HloModule jit_f, entry_computation_layout={()->f32[]}

%region_body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], /*index=1*/f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %w = f32[4,4]{1,0:T(8,128)} constant({...})
  %dot.1 = f32[8,4]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[16,4]{1,0} all-gather(%dot.1), replica_groups=[1,2]<=[2], dimensions={0},
    metadata={op_name="jit(f)/while/body/gather"}
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %dot.1)
}

%region_cond (p.1: (s32[], f32[8,4])) -> pred[] {
  %p.1 = (s32[], f32[8,4]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %constant.7 = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i.1, %constant.7), direction=LT
}

%all-reduce-scatter.3 (input: f32[4,8]) -> f32[4,4] {
  %input = f32[4,8]{1,0} parameter(0)
  %all-reduce.3 = f32[4,8]{1,0} all-reduce(%input), replica_groups={{0,1}}, to_apply=%add
  ROOT %ds = f32[4,4]{1,0} dynamic-slice(%all-reduce.3, %c, %c), dynamic_slice_sizes={4,4}
}

ENTRY %main (a: f32[8,4], b: bf16[2,3]) -> f32[] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = bf16[2,3]{1,0} parameter(1)
  %init = (s32[], f32[8,4]{1,0}) tuple(%zero, %a)
  %while.1 = (s32[], f32[8,4]{1,0}) while(%init), condition=%region_cond, body=%region_body
  %ars = f32[4,4]{1,0} fusion(%big), kind=kCustom, calls=%all-reduce-scatter.3
  %ar = (f32[8,4]{1,0}, bf16[2,3]{1,0}) all-reduce(%a, %b), replica_groups=mesh['x'=2,
    'y'=4] {'x','y'}, to_apply=%add
  %ags = (bf16[2,3]{1,0}, bf16[4,3]{1,0}) all-gather-start(%b), replica_groups={{0,1}}
  %agd = bf16[4,3]{1,0} all-gather-done(%ags)
  %cp = bf16[2,3]{1,0} collective-permute(%b), source_target_pairs={{0,1},{1,0}}
  %conv = f32[8,6]{1,0} convolution(%a, %k), dim_labels=bf_io->bf
  %k = f32[4,6]{1,0} parameter(2)
  ROOT %r = f32[] constant(0)
}
""".replace("\n    ", " ")


def _by_name(colls):
    return {c.name: c for c in colls}


def test_parses_kinds_shapes_groups_and_loop_counts():
    colls = hlo.collectives(TEXT)
    named = _by_name(colls)
    ag = named["ag"]
    assert (ag.kind, ag.dtype, ag.shape, ag.operand_shape) == ("all-gather", "f32", (16, 4),
                                                               (8, 4))
    assert ag.count == 5 and ag.group_size == 2 and ag.bytes == 16 * 4 * 4
    assert ag.op_name == "jit(f)/while/body/gather"
    rs = named["all-reduce.3"]  # TPU's reduce-scatter fusion
    assert (rs.kind, rs.shape, rs.operand_shape, rs.bytes) == ("reduce-scatter", (4, 4),
                                                               (4, 8), 4 * 8 * 4)
    tuple_ar = [c for c in colls if c.name == "ar"]
    assert [(c.dtype, c.shape) for c in tuple_ar] == [("f32", (8, 4)), ("bf16", (2, 3))]
    assert all(c.group_size == 8 for c in tuple_ar)
    start = named["ags"]  # async start: (operand, result) tuple; the -done is not counted
    assert (start.kind, start.shape, start.operand_shape) == ("all-gather", (4, 3), (2, 3))
    assert sum(c.kind == "all-gather" for c in colls) == 2
    assert named["cp"].kind == "collective-permute" and named["cp"].wire_bytes == 12


def test_dot_and_convolution_flops_count_loop_trips():
    # dot 2·8·4·4 per trip × 5 trips; convolution 2·8·6·4 once
    assert hlo.dot_flops(TEXT) == 5 * 2 * 8 * 4 * 4 + 2 * 8 * 6 * 4


def test_helpers_select_and_sum():
    colls = hlo.collectives(TEXT)
    assert [c.name for c in hlo.with_dim(colls, 16)] == ["ag"]
    assert hlo.with_dim(colls, 8) == []  # the operand already has it
    assert {c.name for c in hlo.with_shape(colls, (2, 3))} == {"ar", "ags", "cp"}
    kinds = hlo.by_kind(colls)
    assert kinds["all-gather"]["ops"] == 6
    assert hlo.total_bytes(colls, "all-gather") == 5 * 256 + 24
    assert hlo.nbytes("bf16", (3, 5)) == 30 and hlo.nbytes("pred", ()) == 1


def _fsdp_scan(devices, layers=6, batch=1024, width=256):
    """Gradient of a scanned FSDP MLP stack; returns (compiled text, global dot FLOPs)."""
    mesh = Mesh(np.asarray(devices).reshape(-1), ("fsdp",))

    def loss(ws, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        return jnp.sum(h)

    x = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "fsdp")))
    text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
    return text, 3 * 2 * batch * width * width * layers


def test_compiled_cpu_scan_flops_and_weight_gathers():
    text, global_flops = _fsdp_scan(jax.devices()[:8])
    assert hlo.dot_flops(text) == pytest.approx(global_flops / 8)
    colls = hlo.collectives(text)
    gathers = hlo.with_dim(colls, 256)  # the weights, gathered per layer
    assert gathers and all(c.count == 6 and c.group_size == 8 for c in gathers)
    assert not hlo.with_dim(colls, 1024)  # the token axis is never gathered


def test_compiled_token_axis_gather_is_found():
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    x = jax.ShapeDtypeStruct((4096, 64), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    f = jax.jit(lambda x: jnp.sort(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    colls = hlo.collectives(f.lower(x).compile().as_text())
    assert hlo.with_dim(colls, 4096)


def test_compiled_tpu_scan_flops(tpu_devices):
    text, global_flops = _fsdp_scan(tpu_devices("v5e:2x4"))
    assert hlo.dot_flops(text) == pytest.approx(global_flops / 8)
    assert hlo.Module(text).unknown_loops == 0
    assert all(c.count == 6 for c in hlo.with_dim(hlo.collectives(text), 256))


@pytest.mark.parametrize("padding, strides, rhs_dilation", [
    (((0, 0), (0, 0)), (1, 1), (1, 1)),
    (((2, 1), (0, 3)), (2, 1), (1, 2)),
    (((5, 5), (3, 3)), (1, 3), (2, 1)),  # windows that hit mostly padding
])
def test_convolution_flops_skip_padding_like_xla(padding, strides, rhs_dilation):
    lhs = jax.ShapeDtypeStruct((2, 3, 10, 7), jnp.float32)
    rhs = jax.ShapeDtypeStruct((4, 3, 3, 2), jnp.float32)
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=rhs_dilation))
    compiled = conv.lower(lhs, rhs).compile()
    assert hlo.dot_flops(compiled.as_text()) == compiled.cost_analysis()["flops"]


def _stacked_loop(ws, x, *, n=16):
    """A fori_loop that slices layer i out of stacked weights and writes row i in place."""
    def body(i, carry):
        h, acc = carry
        h = jnp.tanh(h @ jax.lax.dynamic_index_in_dim(ws, i, keepdims=False))
        return h, jax.lax.dynamic_update_index_in_dim(acc, h, i, 0)

    return jax.lax.fori_loop(0, n, body, (x, jnp.zeros((n, *x.shape))))[1].sum()


def _mlp_grad(x, w, w2):
    return jax.grad(lambda w, w2: jnp.sum(jnp.tanh(jax.nn.gelu(x @ w) @ w2) ** 2),
                    argnums=(0, 1))(w, w2)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_traffic_matches_xla_bytes_accessed_with_loops_once(platform, request):
    devices = (request.getfixturevalue("tpu_devices")("v5e:2x2") if platform == "tpu"
               else jax.devices())
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32,  # noqa: E731
                                              sharding=NamedSharding(mesh, P()))
    for fn, args in ((_stacked_loop, (sds(16, 512, 512), sds(256, 512))),
                     (_mlp_grad, (sds(1024, 256), sds(256, 1024), sds(1024, 256)))):
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        xla = compiled.cost_analysis()["bytes accessed"]
        # exact on CPU; TPU's cost model differs in details (in-place fusion outputs,
        # custom calls), the estimate stays within 1.5× of it
        rel = 1e-3 if platform == "cpu" else 0.5
        assert hlo.traffic_bytes(text, loops=False) == pytest.approx(xla, rel=rel)
        if fn is _stacked_loop:  # 16 trips, each reading one 1 MiB layer
            assert hlo.traffic_bytes(text) > xla + 15 * 512 * 512 * 4


def test_opaque_kernels_are_listed_with_their_counts():
    text = TEXT.replace("  ROOT %t = (s32[]", '  %splash_fwd.3 = f32[8,4]{1,0} custom-call(%x), '
                        'custom_call_target="tpu_custom_call"\n  ROOT %t = (s32[]')
    assert hlo.opaque_kernels(text) == {"splash_fwd": 5}
    assert hlo.opaque_kernels(TEXT) == {}
