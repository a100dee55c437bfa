"""The one place that owns numeric tolerances per input dtype."""

import jax.numpy as jnp
import numpy as np

# Kernels compute in f32 whatever the input dtype; bf16/f16 tolerances cover the
# rounding of the *inputs* (the reference sees the same rounded inputs) plus f32 sums.
TOL = {
    "float32": dict(rtol=1e-5, atol=1e-6),
    "bfloat16": dict(rtol=2e-4, atol=2e-5),
    "float16": dict(rtol=2e-4, atol=2e-5),
    "grad": dict(rtol=1e-4, atol=1e-6),
}


def tol(dtype) -> dict:
    """Tolerances for an input dtype (or a named kind such as "grad")."""
    if isinstance(dtype, str) and dtype in TOL:
        return TOL[dtype]
    return TOL[jnp.dtype(dtype).name]


def assert_close(actual, expected, dtype="float32", **override):
    kw = {**tol(dtype), **override}
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected), **kw)
