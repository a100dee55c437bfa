"""Names that settings choose from, without importing what they name (no JAX here).

`DIVERGENCES` lists the divergences of `kdjax.losses` with their keyword arguments (other
than `temperature`) and defaults (`REQUIRED` when there is none), `HIDDEN_LOSSES` its
hidden-state losses, `STORE_MODES` the signals a teacher store holds. Config parsing
checks values against these; tests/test_config_loading.py checks they are the real
functions' signatures and `kdjax.teacher.signal.MODES`.
"""

from __future__ import annotations

REQUIRED = "required"

# name → {keyword argument: default (or REQUIRED)}, in `kdjax.losses.DIVERGENCES` order
DIVERGENCES: dict[str, dict[str, float | str]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "soft_cross_entropy": {},
    "alpha_beta_divergence": {"alpha": REQUIRED, "beta": REQUIRED},
    "adaptive_kl": {"mu": 0.5},
}

# hidden-state losses: `kdjax.losses.hidden_<name>`
HIDDEN_LOSSES = ("mse", "cosine")

# what a teacher store holds per position (`kdjax.teacher.signal`)
STORE_MODES = ("sampled", "topk", "dense")
# stores that keep a few ids per position: the fused kernels support forward_kl only
SPARSE_STORE_MODES = ("topk", "sampled")
