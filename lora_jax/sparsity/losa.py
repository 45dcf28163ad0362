"""The math of LoSA's dynamic schedule (Huang et al., ICLR 2025), as small pure functions.

LoSA prunes in ``T`` steps along a cubic ramp (``cubic_sparsity``); at each step the layer-wise
sparsities come from Representation Mutual Information: block inputs that are linearly similar
(``linear_cka``) to the other blocks' are redundant, redundancy sets importance
(``rmi_importance``), and a small linear program spreads the step's mean sparsity within a band
``±delta`` (``sparsity_band``, ``allocate_sparsity``) so that less important blocks are pruned
more. LoRA ranks follow the blocks' normalised reconstruction errors (``reconstruction_error``,
``allocate_ranks``) and are applied through a fixed-size mask (``rank_mask``) so that shapes never
change. Defaults follow the reference code (github.com/wzhuang-xmu/LoSA): beta = 1, unnormalised
importance, biased linear CKA of per-sample-flattened block inputs, per-channel L2-normalised
error, ranks in [1, 16]. Pruning itself lives in ``pruners.py``; nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cubic_sparsity(target: float, t: int, total_steps: int) -> float:
    """Sparsity after step ``t`` of ``total_steps``: ``S - S * (1 - t / T)**3``.

    Example: ``[cubic_sparsity(0.7, t, 5) for t in range(1, 6)]``
    == [0.3416, 0.5488, 0.6552, 0.6944, 0.7] (up to float round-off).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity S={target} must be in [0, 1).")
    if total_steps <= 0 or not 0 <= t <= total_steps:
        raise ValueError(f"need 0 <= t <= T and T > 0, got t={t}, T={total_steps}.")
    return target - target * (1.0 - t / total_steps) ** 3


_BANDS = ((0.5, 0.01), (0.6, 0.02), (0.7, 0.03), (0.8, 0.04), (0.9, 0.05))


def sparsity_band(s: float) -> float:
    """Half-width ``delta`` of the layer-wise sparsity band around mean sparsity ``s``.

    0.01 if s <= 0.5, 0.02 if s <= 0.6, 0.03 if s <= 0.7 (the paper and reference code, which
    stop there); continued by one hundredth per tenth: 0.04 if s <= 0.8, 0.05 if s <= 0.9.
    Above 0.9, ``delta = (1 - s) / 2`` so that ``s + delta`` stays below 1.
    """
    if not 0.0 <= s < 1.0:
        raise ValueError(f"mean sparsity s={s} must be in [0, 1).")
    for upper, delta in _BANDS:
        if s <= upper:
            return delta
    return (1.0 - s) / 2.0


@jax.jit
def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA (Kornblith et al. 2019), the biased HSIC estimator, of two representations.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc; computed
    through the (n, n) Gram matrices when n is smaller than the feature sizes (same value).

    Args:
      x: (n, d1) and y: (n, d2), rows are the same n examples.
    Returns:
      () float in [0, 1]; 0 when either representation is constant.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {x.shape} and y {y.shape} must be (n, d1) and (n, d2) with the "
                         "same n; flatten per-example features first.")
    x = x.astype(jnp.float32) - jnp.mean(x, axis=0, dtype=jnp.float32)
    y = y.astype(jnp.float32) - jnp.mean(y, axis=0, dtype=jnp.float32)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        gx, gy = x @ x.T, y @ y.T
        cross, nx, ny = jnp.vdot(gx, gy), jnp.linalg.norm(gx), jnp.linalg.norm(gy)
    else:
        cross = jnp.sum((y.T @ x) ** 2)
        nx, ny = jnp.linalg.norm(x.T @ x), jnp.linalg.norm(y.T @ y)
    denom = nx * ny
    return jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), 0.0)


def rmi_importance(block_inputs: Sequence[jax.Array], beta: float = 1.0) -> np.ndarray:
    """Layer importance from redundancy: ``I_l = exp(-beta * r_l / sum_j r_j)``.

    ``r_l = sum_{j != l} CKA(X_l, X_j)`` over the blocks' inputs. As in the reference code,
    beta defaults to 1 and I is not normalised (only its ordering matters to
    ``allocate_sparsity``). If all similarities are zero every block gets I = 1.

    Args:
      block_inputs: L >= 2 arrays of shape (n, ...), the same n calibration examples; each is
        flattened to (n, -1) per example (the reference flattens sequence and hidden axes).
      beta: temperature, >= 0.
    Returns:
      (L,) float64 importances in (0, 1].
    """
    if len(block_inputs) < 2:
        raise ValueError(f"got {len(block_inputs)} block inputs; RMI needs at least 2 blocks.")
    if beta < 0:
        raise ValueError(f"beta={beta} must be >= 0 (the reference uses 1).")
    flat = [jnp.reshape(b, (b.shape[0], -1)) for b in block_inputs]
    num = len(flat)
    cka = np.zeros((num, num))
    for i in range(num):
        for j in range(i + 1, num):
            cka[i, j] = cka[j, i] = float(linear_cka(flat[i], flat[j]))
    redundancy = cka.sum(axis=1)
    total = redundancy.sum()
    normalised = redundancy / total if total > 0 else np.zeros(num)
    return np.exp(-beta * normalised)


def allocate_sparsity(importance: Sequence[float], target: float, delta: float) -> np.ndarray:
    """Layer sparsities x minimising ``sum_l I_l x_l``, mean(x) = target, |x_l - target| <= delta.

    The linear program is solved exactly: everyone starts at the lower bound and the remaining
    budget ``L * target - sum(lower)`` goes to the least important layers first, each up to its
    upper bound (at most one layer ends strictly inside its box). Ties in importance go to the
    lower index. The lower bound is clipped at 0 (early ramp steps); the upper must stay below 1.

    Args:
      importance: (L,) finite importances (``rmi_importance``).
      target: mean sparsity in [0, 1).
      delta: band half-width >= 0 (``sparsity_band(target)``).
    Returns:
      (L,) float64 sparsities.
    """
    imp = np.asarray(importance, dtype=np.float64)
    if imp.ndim != 1 or imp.size == 0 or not np.all(np.isfinite(imp)):
        raise ValueError(f"importance must be a non-empty 1-D finite array, got {imp!r}.")
    if not 0.0 <= target < 1.0 or delta < 0:
        raise ValueError(f"need target in [0, 1) and delta >= 0, got {target}, {delta}.")
    if target + delta >= 1.0:
        raise ValueError(f"target + delta = {target + delta} reaches 1; use a smaller delta "
                         "such as sparsity_band(target).")
    lower, upper = max(target - delta, 0.0), target + delta
    x = np.full(imp.size, lower)
    budget = imp.size * target - x.sum()
    for l in np.argsort(imp, kind="stable"):
        give = min(upper - lower, max(budget, 0.0))
        x[l] += give
        budget -= give
    return x


def allocate_ranks(errors: Sequence[float], mean_rank: int, r_max: int,
                   r_min: int = 1) -> list[int]:
    """Integer LoRA ranks proportional to reconstruction errors with a fixed total.

    ``rho_l = E_l / sum(E) * mean_rank * L`` is rounded and clipped to [r_min, r_max]; then one
    unit at a time is added to the layer with the largest remaining deficit ``rho_l - rank_l``
    (or removed from the largest surplus ``rank_l - rho_l``) among those that can move, until
    ``sum(rank) == mean_rank * L``. Rounding is numpy's half-to-even. Ties go to the larger
    error when adding (smaller when removing), then the lower index, so the result is
    deterministic and monotone in E. All-zero errors give uniform targets.

    Args:
      errors: (L,) non-negative errors (``reconstruction_error`` per block).
      mean_rank: average rank; ``mean_rank * L`` must be an integer in [L r_min, L r_max].
      r_max, r_min: bounds, 1 <= r_min <= r_max (the reference uses 1 and 16).
    Returns:
      L Python ints.
    """
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 1 or err.size == 0 or not np.all(np.isfinite(err)) or np.any(err < 0):
        raise ValueError(f"errors must be a non-empty 1-D array of finite values >= 0, "
                         f"got {err!r}.")
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}.")
    num = err.size
    budget = mean_rank * num
    if abs(budget - round(budget)) > 1e-9:
        raise ValueError(f"mean_rank * L = {budget} is not an integer; pick mean_rank so it is.")
    budget = int(round(budget))
    if not num * r_min <= budget <= num * r_max:
        raise ValueError(f"total rank {budget} cannot be met with {num} layers in "
                         f"[{r_min}, {r_max}]; change mean_rank or the bounds.")
    total = err.sum()
    ideal = err / total * budget if total > 0 else np.full(num, budget / num)
    ranks = np.clip(np.round(ideal), r_min, r_max).astype(np.int64)
    index = np.arange(num)
    while (diff := budget - int(ranks.sum())) != 0:
        step = 1 if diff > 0 else -1
        movable = ranks < r_max if step > 0 else ranks > r_min
        gap = step * (ideal - ranks)
        # lexsort's last key is primary: largest gap, then larger error when adding (smaller
        # when removing), then lower index.
        cand = np.flatnonzero(movable)
        order = np.lexsort((index[cand], -step * err[cand], -gap[cand]))
        ranks[cand[order[0]]] += step
    return [int(r) for r in ranks]


@jax.jit
def reconstruction_error(dense_out: jax.Array, sparse_out: jax.Array) -> jax.Array:
    """Channel-normalised squared error between a block's dense and sparse outputs.

    Leading axes are flattened to N rows; each output channel c is divided by the L2 norm of the
    dense channel over all N rows, then squared errors are summed over rows and averaged over
    channels: ``mean_c ||dense_c - sparse_c||^2 / ||dense_c||^2`` (the reference's definition).
    Channels whose dense norm is 0 are compared unnormalised.

    Args:
      dense_out, sparse_out: (..., d) with equal shapes.
    Returns:
      () float32.
    """
    if dense_out.shape != sparse_out.shape:
        raise ValueError(f"dense_out {dense_out.shape} and sparse_out {sparse_out.shape} must "
                         "match; run both models on the same calibration batch.")
    d = dense_out.shape[-1]
    dense = jnp.reshape(dense_out, (-1, d)).astype(jnp.float32)
    diff = dense - jnp.reshape(sparse_out, (-1, d)).astype(jnp.float32)
    scale = jnp.linalg.norm(dense, axis=0)
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.mean(jnp.sum((diff / scale) ** 2, axis=0))


def rank_mask(rank: int | jax.Array, r_max: int) -> jax.Array:
    """(r_max,) float32 mask ``[1]*rank + [0]*(r_max - rank)`` for fixed-size LoRA factors.

    Multiply it into the rank axis (A's columns / B's rows) so changing the rank never changes
    shapes (no recompilation). ``rank`` may be a traced integer.
    """
    if isinstance(rank, (int, np.integer)) and not 0 <= rank <= r_max:
        raise ValueError(f"rank={rank} must be in [0, r_max={r_max}].")
    return (jnp.arange(r_max) < rank).astype(jnp.float32)
