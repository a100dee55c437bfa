"""Per-chip ceilings for roofline estimates: peak bf16 FLOP/s, HBM size and bandwidth, ICI.

These are vendor / published figures, not measurements: a roofline built on them is an
ESTIMATE of the best a step can do. Where a figure is less certain it says so.

Sources:
  [tpu]  Cloud TPU system architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}
         (peak bf16 FLOP/s, HBM capacity and bandwidth per chip).
  [book] "How to Scale Your Model", Austin et al. 2025, jax-ml.github.io/scaling-book,
         section "TPUs" (ICI one-way bandwidth per link: 4.5e10 B/s on v4/v5e, 9e10 on
         v5p/v6e; HBM bandwidth as in [tpu]).
  [nv]   NVIDIA A100 / H100 / H200 SXM datasheets (dense bf16 tensor-core FLOP/s without
         sparsity; HBM size and bandwidth; NVLink 600 / 900 GB/s bidirectional per GPU).

`ici_bandwidth` is what one chip can push into a ring collective over one mesh axis:
two link directions of a bidirectional ring, 2 × the one-way link figure on TPUs; half
the bidirectional NVLink figure on GPUs.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Ceilings of one accelerator chip (per chip, not per core).

    Attributes:
      name: display name, e.g. "TPU v5p".
      peak_flops: dense bf16 FLOP/s.
      hbm_bytes: HBM capacity in bytes.
      hbm_bandwidth: HBM bytes/s.
      ici_bandwidth: bytes/s into a ring collective along one mesh axis (see module doc).
      source: where the figures come from (keys of the module docstring).
    """

    name: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    ici_bandwidth: float
    source: str


CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 32 * GIB, 1.2e12, 2 * 4.5e10, "[tpu] [book]"),
    "TPU v5e": Chip("TPU v5e", 197e12, 16 * GIB, 8.19e11, 2 * 4.5e10, "[tpu] [book]"),
    "TPU v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2.765e12, 2 * 9e10, "[tpu] [book]"),
    "TPU v6e": Chip("TPU v6e", 918e12, 32 * GIB, 1.64e12, 2 * 9e10, "[tpu] [book]"),
    "A100": Chip("NVIDIA A100 80GB", 312e12, 80 * GIB, 2.039e12, 3e11, "[nv]"),
    "H100": Chip("NVIDIA H100 SXM", 989e12, 80 * GIB, 3.35e12, 4.5e11, "[nv]"),
    "H200": Chip("NVIDIA H200 SXM", 989e12, 141 * 10**9, 4.8e12, 4.5e11, "[nv]"),
}

# `device.device_kind` spellings → table key, longest first when matching ("TPU v5 lite"
# is a v5e, plain "TPU v5" a v5p; libtpu reports both of those spellings)
_ALIASES = {
    "tpu v4": "TPU v4", "tpu v5 lite": "TPU v5e", "tpu v5e": "TPU v5e", "tpu v5p": "TPU v5p",
    "tpu v5": "TPU v5p", "tpu v6 lite": "TPU v6e", "tpu v6e": "TPU v6e", "a100": "A100",
    "h100": "H100", "h200": "H200",
}


def chip_for(device_kind: str) -> Chip | None:
    """The chip whose name `device_kind` contains (e.g. "TPU v5 lite", "NVIDIA H100 80GB
    HBM3"), or None (CPUs and unlisted accelerators: ceilings unknown)."""
    kind = str(device_kind).lower()
    for alias in sorted(_ALIASES, key=len, reverse=True):
        if alias in kind:
            chip = CHIPS[_ALIASES[alias]]
            if chip.name.startswith("NVIDIA A100") and "40gb" in kind:
                return dataclasses.replace(chip, name="NVIDIA A100 40GB", hbm_bytes=40 * GIB,
                                           hbm_bandwidth=1.555e12)
            return chip
    return None


def chip_of(device) -> Chip | None:
    """`chip_for(device.device_kind)` (None for a device without a known kind)."""
    return chip_for(getattr(device, "device_kind", ""))
