"""Teacher-store batch fields → the teacher argument of the fused losses.

The loader (`kdjax.data.Loader(..., teacher_store=store)`) merges `store.read(rows)` into
the batch under `teacher_` keys. `teacher_from_batch` turns those fields into what
`kdjax.losses.fused_distill` takes: `SampledTeacher`, `SparseTeacher` or dense logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

PREFIX = "teacher_"


def _field(batch: Mapping, name: str, prefix: str, mode: str):
    key = prefix + name
    if key not in batch:
        raise KeyError(f"batch has no {key!r} (needed for a {mode!r} teacher store); it has "
                       f"{sorted(batch)}. Build the loader with teacher_store=")
    return batch[key]


def _flat(x, flatten: bool):
    # [B, L, ...] → [B·L, ...]: the fused kernels take tokens on one axis
    return x.reshape((-1,) + x.shape[2:]) if flatten else x


def teacher_from_batch(batch: Mapping, manifest: Mapping, *, tail: str = "renormalize",
                       flatten: bool = False, prefix: str = PREFIX):
    """The fused-loss teacher for a batch read from a teacher store.

    Args:
      batch: mapping with `teacher_ids`/`teacher_counts` (sampled), `teacher_ids`/
        `teacher_logprobs` (topk) or `teacher_logits` (dense), each `[B, L, ...]`.
      manifest: the store's manifest (`store.manifest`); gives the mode and N.
      tail: "renormalize" | "bucket" for top-k stores (see `sparse_forward_kl`).
      flatten: reshape `[B, L, ...]` to `[B·L, ...]`, the layout `fused_distill` takes.
    Returns:
      `SampledTeacher(ids int32, counts int32, num_samples=N)` |
      `SparseTeacher(ids int32, logprobs f32, tail)` | dense logits `[..., V]` (as stored).
      Top-k log-probs and samples are at the store's temperature
      (`manifest["temperature"]`); dense logits are raw.
    """
    from kdjax.losses import SampledTeacher, SparseTeacher

    mode = manifest["mode"]
    if mode == "sampled":
        ids = _field(batch, "ids", prefix, mode)
        counts = _field(batch, "counts", prefix, mode)
        return SampledTeacher(ids=_flat(jnp.asarray(ids).astype(jnp.int32), flatten),
                              counts=_flat(jnp.asarray(counts).astype(jnp.int32), flatten),
                              num_samples=int(manifest["num_samples"]))
    if mode == "topk":
        ids = _field(batch, "ids", prefix, mode)
        logprobs = _field(batch, "logprobs", prefix, mode)
        return SparseTeacher(ids=_flat(jnp.asarray(ids).astype(jnp.int32), flatten),
                             logprobs=_flat(jnp.asarray(logprobs).astype(jnp.float32),
                                            flatten),
                             tail=tail)
    if mode == "dense":
        return _flat(jnp.asarray(_field(batch, "logits", prefix, mode)), flatten)
    raise ValueError(f"unknown teacher store mode {mode!r}; expected sampled, topk or dense")


def hidden_from_batch(batch: Mapping, manifest: Mapping, *, flatten: bool = False,
                      prefix: str = PREFIX) -> dict[int, object]:
    """{layer: teacher hidden states `[B, L, H]`} for the layers the store holds."""
    return {int(h): _flat(jnp.asarray(_field(batch, f"hidden_{int(h)}", prefix, "hidden")),
                          flatten)
            for h in manifest.get("hidden_layers", ())}
