"""Test set-up: 8 fake CPU devices and strict JAX, before anything imports jax."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the `tpu` extra, for ahead-of-time TPU compiles) must not query a cloud
# metadata server: nothing here may reach one
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# xdist workers may start libtpu at the same time; without this the second fails on its lock
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test, seeded from the test's name (reproducible)."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
