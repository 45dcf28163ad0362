"""One-layer pruners: magnitude, Wanda and SparseGPT, from calibration statistics.

Every pruner takes a Flax kernel ``w`` of shape ``(d_in, d_out)`` (``y = x @ w``) and returns
``(w_pruned, mask)`` where ``mask`` is a boolean array of the same shape, ``True`` = kept. The mask
has exactly the requested number of ``False`` entries; entries of ``w`` that are already zero are
pruned first (they count towards the sparsity; if there are more of them than the budget, the
extras stay zero at positions the mask calls kept). Patterns: ``None`` (unstructured) or ``(n, m)``
(N:M: in every group of ``m`` consecutive input features, each output feature keeps ``n``). The
lowest scores are found without sorting: a 32-step binary search for the k-th smallest order-
preserving integer key, ties going to the lower index, which is exactly the mask of a stable double
argsort (tests/sparsity/test_pruner_masks.py). Calibration statistics (``CalibStats``) are
accumulated batch by batch from a layer's inputs. What does not live here: walking a model to
collect inputs, per-layer sparsity allocation (see ``losa.py``), and anything stateful.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

Pattern = tuple[int, int] | None


class CalibStats(NamedTuple):
    """Running calibration statistics of one layer's inputs.

    Attributes:
      col_norm_sq: (d_in,) mean over seen rows of ``x_j**2``, i.e. ``||X_j||^2 / n`` (Wanda).
      hessian: (d_in, d_in) ``2 X^T X / n`` (SparseGPT's layer-wise Hessian).
      count: () number of rows ``n`` seen so far (float32 so the tuple is a plain pytree).
    """

    col_norm_sq: jax.Array
    hessian: jax.Array
    count: jax.Array


def init_calib_stats(d_in: int) -> CalibStats:
    """Empty statistics for a layer with ``d_in`` input features."""
    if d_in <= 0:
        raise ValueError(f"d_in={d_in} must be positive; pass the kernel's w.shape[0].")
    return CalibStats(
        col_norm_sq=jnp.zeros((d_in,), jnp.float32),
        hessian=jnp.zeros((d_in, d_in), jnp.float32),
        count=jnp.zeros((), jnp.float32),
    )


@jax.jit
def update_calib_stats(stats: CalibStats, x: jax.Array) -> CalibStats:
    """Fold a batch of layer inputs ``x`` of shape (..., d_in) into running means.

    Leading axes are flattened into rows (tokens). Means are updated as
    ``new = old * n / (n + b) + batch_sum / (n + b)`` so values stay O(1) over many batches.
    """
    d_in = stats.col_norm_sq.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, stats expect d_in={d_in}; "
                         "pass the layer's input activations, not its outputs.")
    x = jnp.reshape(x, (-1, d_in)).astype(jnp.float32)
    b = jnp.float32(x.shape[0])
    total = stats.count + b
    keep = stats.count / total
    col = stats.col_norm_sq * keep + jnp.sum(x * x, axis=0) / total
    hess = stats.hessian * keep + 2.0 * (x.T @ x) / total
    return CalibStats(col_norm_sq=col, hessian=hess, count=total)


def calib_stats_from_inputs(x: jax.Array) -> CalibStats:
    """Statistics of a single batch ``x`` of shape (..., d_in)."""
    return update_calib_stats(init_calib_stats(x.shape[-1]), x)


# ----------------------------------------------------------------------------- checks & helpers


def num_pruned(size: int, sparsity: float) -> int:
    """Entries to prune out of ``size``: ``floor(sparsity * size)``, robust to float round-off."""
    return int(math.floor(sparsity * size + 1e-6))


def _check_args(w: jax.Array, sparsity: float | None, pattern: Pattern) -> Pattern:
    """Validate a pruner's arguments; returns the pattern as a hashable (n, m) tuple or None."""
    if pattern is not None:
        if len(pattern) != 2 or not all(isinstance(v, numbers.Integral) for v in pattern):
            raise ValueError(f"pattern={pattern} must be (n, m) integers, e.g. (2, 4).")
        pattern = (int(pattern[0]), int(pattern[1]))
    _check_sparsity(sparsity, pattern)
    _check_kernel(w, pattern)
    return pattern


def _check_sparsity(sparsity: float | None, pattern: Pattern) -> None:
    if pattern is not None:
        n, m = pattern
        if not 0 < n <= m:
            raise ValueError(f"pattern={pattern} must be (n, m) integers with 0 < n <= m, "
                             "e.g. (2, 4).")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity={sparsity} disagrees with pattern {n}:{m} "
                             f"(which means sparsity {1 - n / m}); pass sparsity=None.")
        return
    if sparsity is None or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1) for unstructured pruning; "
                         "or pass pattern=(n, m) for N:M.")


def _check_kernel(w: jax.Array, pattern: Pattern) -> None:
    if w.ndim != 2:
        raise ValueError(f"w has shape {w.shape}; expected a 2-D Flax kernel (d_in, d_out). "
                         "Reshape multi-head kernels to 2-D first.")
    if pattern is not None and w.shape[0] % pattern[1]:
        raise ValueError(f"d_in={w.shape[0]} is not divisible by M={pattern[1]} of pattern "
                         f"{pattern}; choose an M that divides d_in.")


def _zeros_first(score: jax.Array, w: jax.Array) -> jax.Array:
    """Scores with existing zeros of ``w`` moved below everything else (pruned first)."""
    return jnp.where(w == 0, -jnp.inf, score)


def _order_key(score: jax.Array) -> jax.Array:
    """uint32 keys (same shape) whose unsigned order is the float order of ``score``.

    Scores are compared as float32 (bf16/f16 widen exactly); -0.0 is folded into +0.0 so equal
    scores get equal keys. Negative floats have their magnitude bits flipped, then the sign bit is
    inverted, the usual radix-sort mapping.
    """
    s = jnp.where(score == 0, 0.0, score.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    negative = bits >= jnp.uint32(0x80000000)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _kth_smallest_key(key: jax.Array, k: int | jax.Array, axis: int | None) -> jax.Array:
    """Smallest t with ``count(key <= t) >= k`` (along ``axis``, or over all of key if None).

    A 32-step binary search over the uint32 range: each step one compare-and-count pass, so the
    cost is O(32 * size) with no sort. With k = 0 it returns 0.
    """
    shape = () if axis is None else key.shape[:axis] + key.shape[axis + 1:]
    lo = jnp.zeros(shape, jnp.uint32)
    hi = jnp.full(shape, 0xFFFFFFFF, jnp.uint32)
    expand = (lambda v: v) if axis is None else (lambda v: jnp.expand_dims(v, axis))

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= expand(mid), axis=axis) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def _pruned_below_kth(key: jax.Array, k: int | jax.Array, axis: int | None) -> jax.Array:
    """Bool, True at the ``k`` lowest keys (along ``axis`` or over all); ties: lower index first.

    Equal to ``argsort(argsort(key, stable=True)) < k``: every key under the k-th smallest
    value ``t``, then the first ``k - count(key < t)`` entries equal to ``t`` in index order.
    """
    t = _kth_smallest_key(key, k, axis)
    t = t if axis is None else jnp.expand_dims(t, axis)
    below = key < t
    ties = key == t
    need = k - jnp.sum(below, axis=axis, keepdims=axis is not None)
    flat = axis is None
    tie_rank = jnp.cumsum(ties.reshape(-1) if flat else ties, axis=0 if flat else axis)
    return below | (ties & (tie_rank.reshape(key.shape) <= need))


def _mask_lowest(score: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keep-mask of score (any shape, flattened): False at the ``k`` lowest (ties: low index)."""
    return ~_pruned_below_kth(_order_key(score), k, None)


def _mask_lowest_per_column(score: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keep-mask of score (d, c): in each column, False at the ``k`` lowest entries."""
    return ~_pruned_below_kth(_order_key(score), k, 0)


def _mask_nm(score: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask of score (d_in, d_out): per output, keep the ``n`` best of each ``m`` inputs.

    An entry's rank in its group is the number of entries below it, ties counted for the lower
    index (a stable sort's rank), from ``m`` compare passes; it is kept when rank >= m - n.
    """
    d_in, d_out = score.shape
    key = _order_key(score).reshape(d_in // m, m, d_out)
    idx = jnp.arange(m)[None, :, None]
    rank = jnp.zeros(key.shape, jnp.int32)
    for j in range(m):
        other = key[:, j:j + 1]
        rank += (other < key) | ((other == key) & (j < idx))
    return (rank >= m - n).reshape(d_in, d_out)


@functools.partial(jax.jit, static_argnames=("pattern", "per_column"))
def _prune_by_score(w: jax.Array, row_scale: jax.Array, k: int, pattern: Pattern,
                    per_column: bool) -> tuple[jax.Array, jax.Array]:
    """Prune w (d_in, d_out) by score ``|w| * row_scale[:, None]``, existing zeros first."""
    score = _zeros_first(jnp.abs(w) * row_scale[:, None], w)
    if pattern is not None:
        mask = _mask_nm(score, *pattern)
    elif per_column:
        mask = _mask_lowest_per_column(score, k)
    else:
        mask = _mask_lowest(score, k)
    return jnp.where(mask, w, 0).astype(w.dtype), mask


# ----------------------------------------------------------------------------- pruners


def magnitude_prune(w: jax.Array, sparsity: float | None,
                    pattern: Pattern = None) -> tuple[jax.Array, jax.Array]:
    """Prune the smallest ``|w|`` of the whole layer (or per N:M group).

    Args:
      w: (d_in, d_out) kernel.
      sparsity: fraction in [0, 1) pruned over all ``d_in * d_out`` entries; None with a pattern.
      pattern: None or (n, m).
    Returns:
      (w_pruned, mask), both (d_in, d_out); mask is bool, True = kept.
    """
    pattern = _check_args(w, sparsity, pattern)
    k = num_pruned(w.size, sparsity) if pattern is None else 0
    return _prune_by_score(w, jnp.ones(w.shape[:1], w.dtype), k, pattern, False)


def wanda_prune(w: jax.Array, col_norm_sq: jax.Array, sparsity: float | None,
                pattern: Pattern = None) -> tuple[jax.Array, jax.Array]:
    """Wanda: score ``|w_ij| * ||X_i||_2`` and prune within each output feature.

    Args:
      w: (d_in, d_out) kernel.
      col_norm_sq: (d_in,) squared input-feature norms ``||X_i||^2`` (any positive multiple,
        e.g. ``CalibStats.col_norm_sq``, gives the same result).
      sparsity: fraction in [0, 1); every column j (output feature) prunes
        ``floor(sparsity * d_in)`` entries. None with a pattern.
      pattern: None or (n, m).
    Returns:
      (w_pruned, mask), both (d_in, d_out); mask is bool, True = kept.
    """
    pattern = _check_args(w, sparsity, pattern)
    if col_norm_sq.shape != (w.shape[0],):
        raise ValueError(f"col_norm_sq has shape {col_norm_sq.shape}, expected ({w.shape[0]},) "
                         "= (d_in,); use CalibStats.col_norm_sq of this layer's inputs.")
    k = num_pruned(w.shape[0], sparsity) if pattern is None else 0
    return _prune_by_score(w, jnp.sqrt(col_norm_sq), k, pattern, True)


def _upper_inverse_cholesky(hessian: jax.Array, percdamp: float) -> jax.Array:
    """Upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), damp = percdamp * mean diag."""
    d = hessian.shape[0]
    damp = percdamp * jnp.mean(jnp.diag(hessian))
    h = hessian + damp * jnp.eye(d, dtype=hessian.dtype)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=hessian.dtype))
    h_inv = (h_inv + h_inv.T) / 2
    return jnp.linalg.cholesky(h_inv).T


def _block_prune_counts(d_out: int, d_in: int, blocksize: int, sparsity: float) -> list[int]:
    """Pruned count per column block so that the layer total is exactly floor(s * d_in * d_out).

    Blocks cover ``ceil(d_in / blocksize) * blocksize`` inputs; the padding inputs (all zero,
    pruned first) of the last block are added to its count.
    """
    counts, done = [], 0
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        target = num_pruned(i2 * d_out, sparsity)
        counts.append(target - done + (i1 + blocksize - i2) * d_out)
        done = target
    return counts


def _obs_block(wt1: jax.Array, hinv1: jax.Array, forced1: jax.Array, k: jax.Array,
               n: int, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SparseGPT on one column block, torch layout.

    Args:
      wt1: (d_out, c) block of W^T (columns = input features).
      hinv1: (c, c) matching block of the upper inverse-Cholesky factor.
      forced1: (d_out, c) bool, entries pruned first (zero in the original kernel).
      k: () int, pruned count for the whole block (unstructured; ignored when n > 0).
      n, m: N:M pattern, or n = m = 0 for unstructured.
    Returns:
      (q1, err1, keep1): pruned block (d_out, c), scaled errors (d_out, c), keep-mask (d_out, c).
    """
    d_out, c = wt1.shape
    diag = jnp.diag(hinv1)
    if n == 0:
        keep0 = _mask_lowest(jnp.where(forced1, -jnp.inf, wt1 ** 2 / diag[None, :] ** 2), k)
    else:
        keep0 = jnp.ones((d_out, c), bool)

    def step(i, carry):
        w1, q1, err1, keep = carry
        if n:
            def choose(keep):
                cols = jax.lax.dynamic_slice(w1, (0, i), (d_out, m))
                dg = jax.lax.dynamic_slice(diag, (i,), (m,))
                frc = jax.lax.dynamic_slice(forced1, (0, i), (d_out, m))
                s = jnp.where(frc, -jnp.inf, cols ** 2 / dg[None, :] ** 2)
                grp = _mask_nm(s.T, n, m).T
                return jax.lax.dynamic_update_slice(keep, grp, (0, i))
            keep = jax.lax.cond(i % m == 0, choose, lambda kp: kp, keep)
        w = w1[:, i]
        q = jnp.where(keep[:, i], w, 0.0)
        e = (w - q) / hinv1[i, i]
        w1 = w1 - e[:, None] * hinv1[i][None, :]
        return w1, q1.at[:, i].set(q), err1.at[:, i].set(e), keep

    zeros = jnp.zeros_like(wt1)
    _, q1, err1, keep = jax.lax.fori_loop(0, c, step, (wt1, zeros, zeros, keep0))
    return q1, err1, keep


@functools.partial(jax.jit, static_argnames=("n", "m", "blocksize"))
def _sparsegpt_sweep(w: jax.Array, hessian: jax.Array, percdamp: jax.Array, counts: jax.Array,
                     n: int, m: int, blocksize: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Whole-layer SparseGPT sweep; returns (w_pruned, keep-mask, Hinv-is-finite), flax layout.

    Inputs are padded with zero weights and an identity inverse factor up to a multiple of
    ``blocksize`` so that one ``lax.scan`` body (compiled once) handles every block.
    """
    d_in, d_out = w.shape
    nblocks = counts.shape[0]
    pad = nblocks * blocksize - d_in
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    h = hessian.astype(dtype)
    dead = jnp.diag(h) == 0
    h = h.at[jnp.diag_indices(d_in)].set(jnp.where(dead, 1.0, jnp.diag(h)))
    hinv = _upper_inverse_cholesky(h, percdamp)
    finite = jnp.all(jnp.isfinite(hinv))
    hinv = jnp.pad(hinv, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d_in + pad) >= d_in)
    wt = jnp.pad(jnp.where(dead[None, :], 0.0, w.T.astype(dtype)), ((0, 0), (0, pad)))
    forced = wt == 0
    cols = jnp.arange(d_in + pad)

    def block(wt, xs):
        i1, k = xs
        q1, err1, keep1 = _obs_block(
            jax.lax.dynamic_slice(wt, (0, i1), (d_out, blocksize)),
            jax.lax.dynamic_slice(hinv, (i1, i1), (blocksize, blocksize)),
            jax.lax.dynamic_slice(forced, (0, i1), (d_out, blocksize)), k, n, m)
        rows = jax.lax.dynamic_slice(hinv, (i1, 0), (blocksize, d_in + pad))
        update = jnp.where(cols[None, :] >= i1 + blocksize, err1 @ rows, 0.0)
        return wt - update, (q1, keep1)

    starts = jnp.arange(nblocks) * blocksize
    _, (qs, keeps) = jax.lax.scan(block, wt, (starts, counts))
    w_pruned = jnp.moveaxis(qs, 0, 1).reshape(d_out, -1)[:, :d_in].T.astype(w.dtype)
    mask = jnp.moveaxis(keeps, 0, 1).reshape(d_out, -1)[:, :d_in].T
    return w_pruned, mask, finite


def sparsegpt_prune(w: jax.Array, hessian: jax.Array, sparsity: float | None,
                    pattern: Pattern = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with updates of the remaining weights.

    Follows the reference: inputs with a zero Hessian diagonal are dead (weights set to zero,
    diagonal set to 1); the Hessian is dampened by ``percdamp * mean(diag)``; the upper Cholesky
    factor of its inverse drives a sweep over input features in blocks of ``blocksize``; within a
    block the mask is chosen adaptively from ``w**2 / diag(Hinv)**2`` (once per block when
    unstructured, at each group start for N:M), each pruned weight's error is spread to later
    inputs of the block, and the block's accumulated error is applied to the inputs after it.
    Unstructured: the pruned count is spread over blocks so the layer total is exactly
    ``floor(sparsity * d_in * d_out)`` (the reference prunes ``int(s * block size)`` per block).

    Args:
      w: (d_in, d_out) kernel.
      hessian: (d_in, d_in) ``2 X^T X / n``, e.g. ``CalibStats.hessian``.
      sparsity: fraction in [0, 1) over the whole layer; None with a pattern.
      pattern: None or (n, m); ``blocksize`` must then be a multiple of m.
      blocksize: input features per lazy-update block.
      percdamp: dampening as a fraction of the mean Hessian diagonal.
    Returns:
      (w_pruned, mask), both (d_in, d_out); mask is bool, True = kept; w_pruned is zero where
      mask is False and the OBS-updated weights elsewhere.
    """
    pattern = _check_args(w, sparsity, pattern)
    d_in, d_out = w.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian has shape {hessian.shape}, expected ({d_in}, {d_in}); "
                         "use CalibStats.hessian of this layer's inputs.")
    if blocksize <= 0 or (pattern is not None and blocksize % pattern[1]):
        raise ValueError(f"blocksize={blocksize} must be positive and a multiple of M "
                         f"(pattern={pattern}); e.g. 128.")
    if not percdamp > 0:
        raise ValueError(f"percdamp={percdamp} must be > 0 (the reference uses 0.01).")
    n, m = pattern if pattern is not None else (0, 0)
    nblocks = -(-d_in // blocksize)
    counts = (_block_prune_counts(d_out, d_in, blocksize, sparsity) if n == 0
              else [0] * nblocks)
    w_pruned, mask, finite = _sparsegpt_sweep(w, hessian, jnp.float32(percdamp),
                                              jnp.asarray(counts, jnp.int32), n=n, m=m,
                                              blocksize=blocksize)
    if not bool(finite):
        raise ValueError("Hessian + dampening is not positive definite; raise percdamp "
                         f"(now {percdamp}) or collect more calibration rows.")
    return w_pruned, mask
