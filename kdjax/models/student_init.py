"""Student initialisation from the teacher (DistilBERT / Minitron-style depth pruning):
a student that keeps a chosen subset of the teacher's layers, with the teacher's
embeddings, final norm and lm_head.

    student = init_from_teacher("teacher_dir", keep_layers=[0, 2, 4, 6, 8, 10])

From a checkpoint directory only the kept layers are read (each straight into its
sharding with `mesh`); from a `Decoder` the kept slices of its stacked parameters are
copied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import DecoderConfig
from .decoder import Decoder

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_keep_layers(keep_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """`keep_layers` as a tuple after checking it is a non-empty, strictly increasing
    sequence of layer indices in `[0, num_layers)` (ValueError naming the value)."""
    if isinstance(keep_layers, (str, bytes)) or not isinstance(keep_layers, Sequence):
        raise ValueError(f"keep_layers={keep_layers!r} must be a list of layer indices, "
                         "e.g. [0, 3, 6]")
    keep = tuple(keep_layers)
    if not keep:
        raise ValueError("keep_layers=[] keeps no layer; name at least one teacher layer")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"keep_layers contains {i!r}, not an int layer index")
        if not 0 <= i < num_layers:
            raise ValueError(f"keep_layers contains {i}, outside [0, {num_layers}) for this "
                             f"{num_layers}-layer teacher")
    for a, b in zip(keep, keep[1:]):
        if b <= a:
            raise ValueError(f"keep_layers={list(keep)} must be strictly increasing ({a} is "
                             f"followed by {b}); the student keeps the teacher's order")
    return tuple(int(i) for i in keep)


def _student_config(teacher_cfg: DecoderConfig, keep: tuple[int, ...],
                    overrides: dict) -> DecoderConfig:
    if "num_layers" in overrides:
        raise ValueError(f"num_layers={overrides['num_layers']!r} cannot be overridden: the "
                         f"student has len(keep_layers)={len(keep)} layers")
    return teacher_cfg.replace(num_layers=len(keep), **overrides)


def init_from_teacher(teacher: Decoder | str | os.PathLike, keep_layers: Sequence[int], *,
                      mesh: jax.sharding.Mesh | None = None, **overrides) -> Decoder:
    """A student `Decoder` with the teacher's embeddings, final norm and lm_head and
    the teacher's layers `keep_layers` (in order); its config is the teacher's with
    `num_layers=len(keep_layers)`.

    Args:
      teacher: a `Decoder`, a Hugging Face checkpoint directory, or a `.gguf` file.
      keep_layers: strictly increasing teacher layer indices, e.g. `[0, 3, 6, 9]`.
      mesh: optional mesh; the student's parameters are placed by their logical axes.
      **overrides: other `DecoderConfig` fields for the student that keep the parameter
        shapes, e.g. `remat="full"`, `dtype="bfloat16"`, `param_dtype="bfloat16"`.

    Raises:
      ValueError: a bad `keep_layers` (empty, out of range, not increasing), an override
        of num_layers or of a parameter shape.
    """
    if isinstance(teacher, Decoder):
        return _from_decoder(teacher, keep_layers, mesh, overrides)
    path = Path(teacher)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from .hf import from_pretrained

        return _from_decoder(from_pretrained(path), keep_layers, mesh, overrides)
    return _from_directory(path, keep_layers, mesh, overrides)


def _from_directory(path: Path, keep_layers, mesh, overrides) -> Decoder:
    from transformers import AutoConfig

    from . import safetensors_io
    from .hf import from_tensors

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"teacher {path} has no config.json; pass a directory written "
                                "by transformers' save_pretrained, a .gguf file or a Decoder")
    teacher_cfg = DecoderConfig.from_hf(AutoConfig.from_pretrained(path))
    keep = check_keep_layers(keep_layers, teacher_cfg.num_layers)
    cfg = _student_config(teacher_cfg, keep, overrides)
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = {}  # the student's tensor names → the teacher's memory-mapped tensors
    for name, tensor in safetensors_io.open_tensors(path).items():
        m = _LAYER.match(name)
        if m is None:
            tensors[name] = tensor
        elif int(m[1]) in new_index:
            tensors[f"model.layers.{new_index[int(m[1])]}.{m[2]}"] = tensor
    return from_tensors(cfg, tensors, mesh=mesh, source=path)


def _from_decoder(teacher: Decoder, keep_layers, mesh, overrides) -> Decoder:
    from kdjax.sharding import named_sharding, variable_logical_axes

    keep = check_keep_layers(keep_layers, teacher.config.num_layers)
    cfg = _student_config(teacher.config, keep, overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    have = dict(nnx.to_flat_state(nnx.state(teacher)))
    index = jnp.asarray(keep, jnp.int32)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in have:
            raise ValueError(f"the student has parameter {path} that the teacher lacks; "
                             f"overrides {overrides} change the parameter structure")
        value = have[path].get_value()
        if path[0] == "layers":
            value = jnp.take(value, index, axis=0)
        target = var.get_value()
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"parameter {path}: the teacher's {tuple(value.shape)} does not "
                             f"fit the student's {tuple(target.shape)}; overrides "
                             f"{overrides} must keep the parameter shapes")
        # a copy: the student never aliases the teacher's buffers (a donated student
        # buffer must not delete the teacher's)
        value = jnp.array(value, dtype=target.dtype, copy=True)
        if mesh is not None:
            value = jax.device_put(value, named_sharding(mesh, variable_logical_axes(var),
                                                         target.shape))
        out.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))
