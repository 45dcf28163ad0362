"""Sparsity: one-layer pruners (magnitude, Wanda, SparseGPT) and LoSA's schedule math.

Importing this package has no side effects. Model-level drivers live elsewhere.
"""

from lora_jax.sparsity.losa import (
    allocate_ranks,
    allocate_sparsity,
    cubic_sparsity,
    linear_cka,
    rank_mask,
    reconstruction_error,
    rmi_importance,
    sparsity_band,
)
from lora_jax.sparsity.pruners import (
    CalibStats,
    calib_stats_from_inputs,
    init_calib_stats,
    magnitude_prune,
    num_pruned,
    sparsegpt_prune,
    update_calib_stats,
    wanda_prune,
)

__all__ = [
    "CalibStats",
    "allocate_ranks",
    "allocate_sparsity",
    "calib_stats_from_inputs",
    "cubic_sparsity",
    "init_calib_stats",
    "linear_cka",
    "magnitude_prune",
    "num_pruned",
    "rank_mask",
    "reconstruction_error",
    "rmi_importance",
    "sparsegpt_prune",
    "sparsity_band",
    "update_calib_stats",
    "wanda_prune",
]
