"""Shared helpers of the kdjax.compile tests: TPU topologies through libtpu, when present."""

import importlib.util
import os

import pytest

# compile-only libtpu in several processes at once (pytest -n 2, a benchmark alongside)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _libtpu_reason() -> str | None:
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (pip install -e '.[tpu]'): no ahead-of-time TPU compile"
    try:
        from jax.experimental import topologies

        topologies.get_topology_desc("v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001  (any libtpu start-up failure means: skip)
        return f"libtpu is installed but cannot describe a TPU topology here: {e}"
    return None


@pytest.fixture(scope="session")
def tpu_devices():
    """`devices(name)` → the TPU devices of topology `name`, or skip with the reason."""
    reason = _libtpu_reason()
    if reason:
        pytest.skip(reason)
    from jax.experimental import topologies

    return lambda name: topologies.get_topology_desc(name, platform="tpu").devices
