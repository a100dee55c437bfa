"""Backend-specific tuning, in one place, keyed on the platform a step is compiled *for*.

Every choice that depends on the hardware (XLA:CPU's fast dot forms, 16-bit bit tricks,
optimization barriers, chunk sizes, the RNG implementation, the attention kernel) asks
this module, never `jax.default_backend()` directly. The platform is, in order:

1. the one set by `with platform.target("tpu")` (or a mesh / devices) around tracing;
2. the platform of the mesh in context (`jax.set_mesh(mesh)`): an ahead-of-time compile
   for a TPU topology from a CPU host traces under a TPU mesh and gets the TPU path;
3. `jax.default_backend()`.

Everywhere other than CPU the plain forms are used: on GPU/TPU a transpose is a free
operand flag, bf16 slices natively and threefry is cheap next to the step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdjax_platform",
                                                                      default=None)


def normalize(name: str) -> str:
    """"cpu" | "gpu" | "tpu" for a JAX platform name ("cuda" and "rocm" are "gpu")."""
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; expected one of {PLATFORMS}")
    return name


def _platform_of(where) -> str:
    if isinstance(where, str):
        return normalize(where)
    devices = getattr(where, "devices", where)  # a Mesh, or a sequence of devices
    if hasattr(devices, "flat"):
        devices = list(devices.flat)
    devices = list(devices)
    if not devices:
        raise ValueError("platform.target needs a platform name, a mesh or devices")
    return normalize(devices[0].platform)


@contextlib.contextmanager
def target(where) -> Iterator[str]:
    """Traces inside this block tune for `where`: "cpu" | "gpu" | "tpu", a Mesh or devices."""
    token = _override.set(_platform_of(where))
    try:
        yield _override.get()
    finally:
        _override.reset(token)


def current() -> str:
    """The platform the computation being traced is compiled for (see the module doc)."""
    explicit = _override.get()
    if explicit is not None:
        return explicit
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return normalize(device.platform)
    return normalize(jax.default_backend())


def is_cpu() -> bool:
    return current() == "cpu"


# ----------------------------------------------------------------- the tuning table
# Each entry says what it changes and why; the numbers behind the CPU entries are in
# benchmarks/results/ (model.md, losses.md, precompute.md).


def pin_weight_grad_transpose(k: int, m: int) -> bool:
    """Materialize `xᵀ` (behind an optimization barrier) before a `[K, M]` weight-gradient
    dot: XLA:CPU runs the dim-0-contracting form slower (kdjax.linalg); below 2¹⁸
    output elements the copy costs more than it saves. Elsewhere the transpose is free."""
    return is_cpu() and k * m >= 2**18


def row_view_reductions() -> bool:
    """Reduce over the last axis on a 2-D `[rows, last]` view: XLA:CPU reduces arrays
    with a leading axis of size 1 slower (benchmarks/results/layers.md). The reshape
    merges batch axes, which under sharding can force a gather, so it is a CPU-only
    form."""
    return is_cpu()


def attention_head_major() -> bool:
    """Run grouped-query attention as one `[B, kv, g·L, d]` batched matmul per kv head
    (each kv head's query group folded into the rows): faster fwd+bwd on XLA:CPU than
    the 5-D einsum, whose gradients XLA transposes. The fold merges the head axis (split
    over `tensor`) with the length axis, which forces a gather of q and of the logits
    under tensor parallelism, so elsewhere the heads stay a separate axis."""
    return is_cpu()


def param_rng_impl() -> str:
    """PRNG implementation for parameter init: XLA:CPU compiles RngBitGenerator ("rbg")
    faster than threefry, which dominates start-up on CPU."""
    return "rbg" if is_cpu() else "threefry2x32"


def fused_chunk_bytes() -> int:
    """Target bytes of one chunk's f32 logits in the fused loss (a few are alive at once)."""
    return 32 * 2**20


def precompute_chunk_tokens() -> int:
    """Positions per device whose teacher logits are reduced to the signal at once: on CPU
    a `[256, 32k]` f32 block stays near the L3 cache without re-packing the LM head too
    often (benchmarks/results/precompute.md); accelerators prefer larger blocks."""
    return 256 if is_cpu() else 1024


def causal_query_blocks_enabled() -> bool:
    """Split causal self-attention into query blocks that skip masked key blocks (XLA
    reference attention on CPU; accelerators use their fused kernels instead)."""
    return is_cpu()


def attention_impl(requested: str = "auto") -> str:
    """The attention kernel: "xla" (the reference, any platform), "cudnn" (GPU, through
    `jax.nn.dot_product_attention`) or "splash" (TPU Pallas splash attention). "auto"
    picks the fused kernel of the platform."""
    if requested != "auto":
        return requested
    return {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}[current()]
