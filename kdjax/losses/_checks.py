"""Trace-time argument checks shared by the loss kernels.

Every check raises a ValueError/TypeError that names the argument, the value seen and
what is expected, so that a bad call fails before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value, name: str) -> float | None:
    """Returns `value` as a Python float, or None when it is traced (e.g. a schedule).

    NumPy (not jnp) does the conversion: under jit, `jnp.asarray(1.0)` is itself a
    tracer, while a Python/NumPy scalar or a concrete jax.Array is a known value.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real scalar, got {value!r}") from e
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == bool):
        raise TypeError(f"{name} must be a real scalar, got {value!r} of dtype {arr.dtype}")
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


def check_positive(value, name: str) -> float | None:
    v = concrete_float(value, name)
    if v is not None and not v > 0.0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def check_positive_int(value, name: str) -> int:
    """A static Python int > 0 (it fixes a normalisation, so it may not be traced)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a Python int > 0, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_floating(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{name} must be a floating array (f32/bf16/f16), got dtype {jnp.result_type(x)}"
        )


def check_integer(x, name: str) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")


def check_same_shape(a, b, name_a: str, name_b: str, axis_name: str = "vocabulary") -> None:
    if jnp.shape(a) != jnp.shape(b):
        sa, sb = jnp.shape(a), jnp.shape(b)
        hint = ""
        if len(sa) == len(sb) and len(sa) > 0 and sa[:-1] == sb[:-1]:
            hint = f" The last ({axis_name}) axes differ ({sa[-1]} vs {sb[-1]})"
            if axis_name == "vocabulary":
                hint += (": pad the smaller vocabulary with -inf logits or slice both to the "
                         "shared vocabulary.")
            else:
                hint += "."
        raise ValueError(f"{name_a} has shape {sa} but {name_b} has shape {sb}.{hint}")


def check_rank_at_least(x, rank: int, name: str) -> None:
    if jnp.ndim(x) < rank:
        raise ValueError(f"{name} must have at least {rank} dimension(s), got shape {jnp.shape(x)}")


def positive_float_or_none(value, name: str) -> float | None:
    """A static Python float > 0, or None (an optional cap such as `logit_softcap`)."""
    if value is None:
        return None
    v = concrete_float(value, name)
    if v is None or not v > 0:
        raise ValueError(f"{name} must be a positive Python float or None, got {value!r}")
    return v


def flat_tokens(x, lead: tuple[int, ...], name: str, *, trailing: int = 0):
    """Checks `x.shape == lead + (trailing dims)` (lead = hidden's token axes) and flattens
    the `lead` axes into one, `[N, ...]`."""
    shape = jnp.shape(x)
    k = len(shape) - trailing
    if tuple(shape[:k]) != tuple(lead) or len(shape) != len(lead) + trailing:
        expect = "[" + ", ".join(map(str, lead)) + (", …" * trailing) + "]"
        raise ValueError(f"{name} has shape {shape}; expected {expect} to match hidden's "
                         f"leading (token) axes {tuple(lead)}")
    return jnp.reshape(x, (int(np.prod(lead, dtype=np.int64)), *shape[k:]))
