"""The sort-free mask selection in ``pruners`` equals the double-argsort one it replaced.

The reference functions below are the previous implementation, kept verbatim as the oracle:
the rank of every entry from ``argsort(argsort(score, stable=True))``. Scores are built with many
exact ties, existing zeros (-inf scores), bf16 inputs and every pattern the pruners use.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.sparsity import pruners
from lora_jax.sparsity.pruners import _mask_lowest, _mask_lowest_per_column, _mask_nm


def _old_mask_lowest(score, k):
    flat = score.reshape(-1)
    ranks = jnp.argsort(jnp.argsort(flat, stable=True))
    return (ranks >= k).reshape(score.shape)


def _old_mask_lowest_per_column(score, k):
    ranks = jnp.argsort(jnp.argsort(score, axis=0, stable=True), axis=0)
    return ranks >= k


def _old_mask_nm(score, n, m):
    d_in, d_out = score.shape
    grouped = score.reshape(d_in // m, m, d_out)
    ranks = jnp.argsort(jnp.argsort(grouped, axis=1, stable=True), axis=1)
    return (ranks >= m - n).reshape(d_in, d_out)


def _scores(seed, shape, levels, dtype=jnp.float32):
    """|w|-like scores with heavy ties (``levels`` distinct values) and -inf for existing zeros."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, size=shape).astype(np.float32) / levels
    s[rng.random(shape) < 0.1] = -np.inf
    s[rng.random(shape) < 0.05] = 0.0
    return jnp.asarray(s).astype(dtype)


# One compile per function and shape: k is traced.
_new_lowest, _ref_lowest = jax.jit(_mask_lowest), jax.jit(_old_mask_lowest)
_new_col, _ref_col = jax.jit(_mask_lowest_per_column), jax.jit(_old_mask_lowest_per_column)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_lowest_equals_double_argsort(dtype):
    for levels in (3, 50, 100000):
        s = _scores(levels, (48, 40), levels, dtype)
        for k in (0, 1, 7, 500, 960, 1919, 1920):
            new = _new_lowest(s, jnp.int32(k))
            np.testing.assert_array_equal(new, _ref_lowest(s, jnp.int32(k)),
                                          err_msg=f"levels={levels} k={k}")
            assert int(jnp.sum(~new)) == k


def test_mask_per_column_equals_double_argsort():
    for levels in (2, 20, 100000):
        s = _scores(levels + 1, (64, 24), levels)
        for k in (0, 1, 13, 32, 63, 64):
            np.testing.assert_array_equal(_new_col(s, jnp.int32(k)), _ref_col(s, jnp.int32(k)),
                                          err_msg=f"levels={levels} k={k}")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3), (1, 1)])
@pytest.mark.parametrize("levels", [2, 1000])
def test_mask_nm_equals_double_argsort(n, m, levels):
    s = _scores(n * 10 + m, (48 if 48 % m == 0 else 45, 20), levels)
    np.testing.assert_array_equal(_mask_nm(s, n, m), _old_mask_nm(s, n, m))


def test_mask_lowest_with_traced_k_under_jit():
    s = _scores(7, (32, 16), 5)
    for k in (0, 100, 512):  # also the eager path with a Python int
        np.testing.assert_array_equal(_mask_lowest(s, k), _ref_lowest(s, jnp.int32(k)))


def test_negative_scores_and_signed_zero_order_like_floats():
    s = jnp.asarray([[0.0, -0.0, -1.5, 2.0], [-np.inf, 1e-30, -1e-30, 0.0]], jnp.float32)
    for k in range(9):
        np.testing.assert_array_equal(_new_lowest(s, jnp.int32(k)), _ref_lowest(s, jnp.int32(k)))


def _old_prune_by_score(w, row_scale, k, pattern, per_column):
    score = jnp.where(w == 0, -jnp.inf, jnp.abs(w) * row_scale[:, None])
    if pattern is not None:
        mask = _old_mask_nm(score, *pattern)
    elif per_column:
        mask = _old_mask_lowest_per_column(score, k)
    else:
        mask = _old_mask_lowest(score, k)
    return jnp.where(mask, w, 0).astype(w.dtype), mask


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_pruners_equal_old_masks_on_fixed_tied_kernel(pattern):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.integers(-4, 5, size=(64, 32)).astype(np.float32) / 4)  # ties, zeros
    col = jnp.asarray(rng.integers(1, 4, size=(64,)).astype(np.float32))
    s = None if pattern else 0.5
    k_layer = 0 if pattern else pruners.num_pruned(w.size, 0.5)
    k_col = 0 if pattern else pruners.num_pruned(64, 0.5)
    _, mag = pruners.magnitude_prune(w, s, pattern)
    _, wan = pruners.wanda_prune(w, col, s, pattern)
    np.testing.assert_array_equal(mag, _old_prune_by_score(w, jnp.ones(64), k_layer, pattern,
                                                           False)[1])
    np.testing.assert_array_equal(wan, _old_prune_by_score(w, jnp.sqrt(col), k_col, pattern,
                                                           True)[1])


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_masks_equal_the_double_argsort_version(pattern, monkeypatch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(256, 64)).astype(np.float32))
    w = jnp.asarray(rng.integers(-3, 4, size=(64, 24)).astype(np.float32))
    h = pruners.calib_stats_from_inputs(x).hessian
    s = None if pattern else 0.6
    new_w, new_mask = pruners.sparsegpt_prune(w, h, s, pattern, blocksize=16)
    monkeypatch.setattr(pruners, "_mask_lowest", _old_mask_lowest)
    monkeypatch.setattr(pruners, "_mask_nm", _old_mask_nm)
    pruners._sparsegpt_sweep.clear_cache()
    try:
        old_w, old_mask = pruners.sparsegpt_prune(w, h, s, pattern, blocksize=16)
    finally:
        pruners._sparsegpt_sweep.clear_cache()
    np.testing.assert_array_equal(new_mask, old_mask)
    np.testing.assert_array_equal(new_w, old_w)
