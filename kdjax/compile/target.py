"""The devices a step is compiled for: a TPU topology (through libtpu, from any host) or N
CPU devices of this process (fake devices when the host has fewer)."""

from __future__ import annotations

import os

import jax


class TargetError(ValueError):
    """A topology or device count that cannot be used; the message says what to do."""


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. "v5e:4x4", "v5p:4x4x4") for ahead-of-time
    compiles. Local computation stays on CPU and libtpu asks no cloud metadata server
    (this host need not be a TPU VM)."""
    # compile-only use of libtpu: several processes may hold it (tests, a benchmark)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not _backends_started():
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TargetError("--topology needs libtpu (TPU compiler) on this host: pip install "
                          "-e '.[tpu]' (or pip install 'jax[tpu]')") from None
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(name, platform="tpu").devices
    except Exception as e:  # libtpu reports bad names as INVALID_ARGUMENT runtime errors
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "INVALID_ARGUMENT" not in detail:
            raise TargetError(f"libtpu could not describe TPU topology {name!r}: {detail}; "
                              "rerun with --debug for the traceback") from None
        raise TargetError(f"unknown TPU topology {name!r} ({detail}); use GENERATION:SHAPE, "
                          "e.g. v5e:4x4 (16 chips), v5p:2x4x4 (32 chips), v5p:4x4x8, "
                          "v6e:8x8, v4:2x2x4") from None
    return list(devices)


def cpu_devices(n: int) -> list:
    """`n` CPU devices of this process: fake ones are made when JAX has not started yet;
    otherwise the process must already have at least `n`."""
    if n < 1:
        raise TargetError(f"--devices must be >= 1, got {n}")
    if not _backends_started():  # CPU only: no accelerator runtime is started for this
        if not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
    have = jax.devices("cpu")
    if len(have) < n:
        raise TargetError(
            f"--devices {n}: this process already started JAX with {len(have)} CPU devices; "
            f"run it in a fresh process, e.g. XLA_FLAGS=--xla_force_host_platform_device_"
            f"count={n} kdjax compile …")
    return list(have[:n])


def describe(devices) -> str:
    """"4 × TPU v5 lite (tpu)"-style summary of a device list."""
    d = devices[0]
    return f"{len(devices)} × {d.device_kind} ({d.platform})"
