"""Sparsity: pruners (magnitude, Wanda, SparseGPT), model-level pruning, and LoSA's schedule.

``pruners.py`` prunes one kernel; ``model.py`` walks a model's blocks over calibration batches
(``prune_model``); ``losa.py`` is the schedule's pure math; ``schedule.py`` runs LoSA's iterations
on a model with sparse adapters (``methods/sparse.py``) and hooks them into the trainer.
Importing this package has no side effects.
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
from lora_jax.sparsity.model import (
    capture_blocks,
    measured_sparsity,
    prune_blocks,
    prune_model,
    run_blocks,
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
from lora_jax.sparsity.schedule import LosaHook, LosaOptions, losa_iteration, merged_sparsity

__all__ = [
    "CalibStats",
    "LosaHook",
    "LosaOptions",
    "capture_blocks",
    "losa_iteration",
    "measured_sparsity",
    "merged_sparsity",
    "prune_blocks",
    "prune_model",
    "run_blocks",
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
