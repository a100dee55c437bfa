"""The one place that names mesh axes and maps logical axis names onto them.

Everything else in kdjax speaks logical names (`"batch"`, `"vocab"`, `"embed"`, …);
this table decides which mesh axis, if any, shards each one (MaxText-style rules).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": (DATA, FSDP),
    "length": None,
    "embed": FSDP,
    "vocab": TENSOR,
    "mlp": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "layers": None,
    "norm": None,
    "candidates": None,
    "topk": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                         f"tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fixed axes of size "
                             f"{known} (data={data}, fsdp={fsdp}, tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = "
                         f"{int(np.prod(sizes))} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: dict[str, str | tuple[str, ...] | None] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec. Mesh axes of size 1 are dropped and
    a mesh axis is used at most once (later uses become replicated)."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else target
        keep = tuple(a for a in axes if a not in used
                     and (mesh is None or mesh.shape.get(a, 1) > 1))
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh=mesh))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch axis is split (data × fsdp)."""
    return int(mesh.shape[DATA] * mesh.shape[FSDP])
