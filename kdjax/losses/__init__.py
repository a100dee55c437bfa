"""Pure, jit-compatible distillation loss kernels (see DESIGN.md, "Loss catalog")."""

from kdjax.losses.divergences import (
    DIVERGENCES,
    adaptive_kl,
    alpha_beta_divergence,
    cross_entropy,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)
from kdjax.losses.reduce import Weighted, masked_mean, masked_sum_count

__all__ = [
    "DIVERGENCES",
    "Weighted",
    "adaptive_kl",
    "alpha_beta_divergence",
    "cross_entropy",
    "divergence",
    "forward_kl",
    "jsd",
    "masked_mean",
    "masked_sum_count",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "tvd",
]
