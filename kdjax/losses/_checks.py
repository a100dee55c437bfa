"""Trace-time argument checks shared by the loss kernels.

Every check raises a ValueError/TypeError that names the argument, the value seen and
what is expected, so that a bad call fails before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def concrete_float(value, name: str) -> float | None:
    """Returns `value` as a Python float, or None when it is traced (e.g. a schedule)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = jnp.asarray(value)
    except TypeError as e:
        raise TypeError(f"{name} must be a real scalar, got {value!r}") from e
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    return float(arr)


def check_temperature(temperature) -> None:
    t = concrete_float(temperature, "temperature")
    if t is not None and not t > 0.0:
        raise ValueError(f"temperature must be > 0, got {t}. Use 1.0 for plain distributions.")


def check_unit_interval(value, name: str) -> float | None:
    v = concrete_float(value, name)
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {v}")
    return v


def check_floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating array (f32/bf16/f16), got dtype {x.dtype}")


def check_integer(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        sa, sb = jnp.shape(a), jnp.shape(b)
        hint = ""
        if len(sa) == len(sb) and sa[:-1] == sb[:-1]:
            hint = (
                f" The last (vocabulary) axes differ ({sa[-1]} vs {sb[-1]}): pad the smaller "
                "vocabulary with -inf logits or slice both to the shared vocabulary."
            )
        raise ValueError(f"{name_a} has shape {sa} but {name_b} has shape {sb}.{hint}")


def check_rank_at_least(x, rank: int, name: str) -> None:
    if jnp.ndim(x) < rank:
        raise ValueError(f"{name} must have at least {rank} dimension(s), got shape {jnp.shape(x)}")
