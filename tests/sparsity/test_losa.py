"""Tests for LoSA's schedule math (lora_jax.sparsity.losa)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from lora_jax.sparsity import (
    allocate_ranks,
    allocate_sparsity,
    cubic_sparsity,
    linear_cka,
    rank_mask,
    reconstruction_error,
    rmi_importance,
    sparsity_band,
)

# ----------------------------------------------------------------------------- ramp and band


def test_cubic_ramp_values():
    got = [cubic_sparsity(0.7, t, 5) for t in range(1, 6)]
    np.testing.assert_allclose(got, [0.3416, 0.5488, 0.6552, 0.6944, 0.7], atol=1e-12)
    assert cubic_sparsity(0.7, 0, 5) == 0.0


@pytest.mark.parametrize("args", [(1.0, 1, 5), (0.5, 6, 5), (0.5, -1, 5), (0.5, 0, 0)])
def test_cubic_ramp_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        cubic_sparsity(*args)


@pytest.mark.parametrize("s, delta", [(0.0, 0.01), (0.3416, 0.01), (0.5, 0.01), (0.5488, 0.02),
                                      (0.6, 0.02), (0.6552, 0.03), (0.7, 0.03), (0.75, 0.04),
                                      (0.8, 0.04), (0.9, 0.05), (0.96, 0.02)])
def test_sparsity_band(s, delta):
    assert sparsity_band(s) == pytest.approx(delta)
    assert s + sparsity_band(s) < 1


# ----------------------------------------------------------------------------- CKA and RMI


def _cka_numpy(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_formula_in_both_paths_and_is_invariant():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = x @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(40, 9))
    ref = _cka_numpy(x, y)
    assert float(linear_cka(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(ref, rel=1e-4)
    wide = rng.normal(size=(40, 50))  # n < d: Gram path
    assert float(linear_cka(jnp.asarray(x), jnp.asarray(wide))) == pytest.approx(
        _cka_numpy(x, wide), rel=1e-4)
    rot = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    assert float(linear_cka(jnp.asarray(x), jnp.asarray(3 * x @ rot + 2))) == pytest.approx(1, 1e-5)
    assert float(linear_cka(jnp.asarray(x), jnp.ones((40, 3)))) == 0.0


def test_rmi_importance_hand_case():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(32, 4, 8))              # (n, seq, hidden): flattened per example
    b = 2 * a + 1                                 # same representation
    c = rng.normal(size=(32, 4, 8))              # unrelated
    imp = rmi_importance([jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)], beta=1.0)
    fa, fc = a.reshape(32, -1), c.reshape(32, -1)
    k = _cka_numpy(fa, fc)
    red = np.array([1 + k, 1 + k, 2 * k])
    np.testing.assert_allclose(imp, np.exp(-red / red.sum()), rtol=1e-4)
    assert imp[2] > imp[0] == pytest.approx(imp[1])   # the redundant pair is less important
    np.testing.assert_array_equal(rmi_importance([jnp.asarray(a), jnp.asarray(c)], beta=0), 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        rmi_importance([jnp.asarray(a)])


# ----------------------------------------------------------------------------- sparsity LP


def test_allocate_sparsity_hand_case():
    x = allocate_sparsity([0.5, 0.9, 0.7], target=0.5, delta=0.01)
    np.testing.assert_allclose(x, [0.51, 0.49, 0.50], atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_allocate_sparsity_equals_linprog(seed):
    rng = np.random.default_rng(seed)
    num = int(rng.integers(2, 40))
    imp = np.exp(-rng.random(num))
    target = float(rng.uniform(0.05, 0.9))
    delta = sparsity_band(target)
    x = allocate_sparsity(imp, target, delta)
    assert x.mean() == pytest.approx(target, abs=1e-12)
    assert np.all(x >= target - delta - 1e-12) and np.all(x <= target + delta + 1e-12)
    res = linprog(imp, A_eq=np.ones((1, num)) / num, b_eq=[target],
                  bounds=[(target - delta, target + delta)] * num, method="highs")
    assert res.status == 0
    assert imp @ x == pytest.approx(res.fun, abs=1e-9)


def test_allocate_sparsity_clips_lower_bound_and_rejects_bad_input():
    x = allocate_sparsity([1.0, 2.0], target=0.005, delta=0.01)
    np.testing.assert_allclose(x, [0.01, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="reaches 1"):
        allocate_sparsity([1.0, 2.0], 0.95, 0.06)
    with pytest.raises(ValueError, match="importance"):
        allocate_sparsity([], 0.5, 0.01)


# ----------------------------------------------------------------------------- ranks


def test_allocate_ranks_hand_cases():
    assert allocate_ranks([1, 2, 3, 10], mean_rank=6, r_max=16) == [2, 3, 4, 15]
    # ideal [0.16, 0.16, 0.16, 15.5] -> clip [1, 1, 1, 8] (sum 11) -> +5 by largest deficit
    assert allocate_ranks([1, 1, 1, 100], mean_rank=4, r_max=8) == [3, 3, 2, 8]
    assert allocate_ranks([0, 0, 0], mean_rank=2, r_max=4) == [2, 2, 2]


@pytest.mark.parametrize("seed", range(10))
def test_allocate_ranks_budget_bounds_and_monotone(seed):
    rng = np.random.default_rng(seed)
    num = int(rng.integers(2, 33))
    errors = rng.exponential(size=num) ** 2
    mean_rank, r_max, r_min = int(rng.integers(2, 9)), 16, int(rng.integers(1, 3))
    ranks = np.array(allocate_ranks(errors, mean_rank, r_max, r_min))
    assert ranks.sum() == mean_rank * num
    assert ranks.min() >= r_min and ranks.max() <= r_max
    order = np.argsort(errors)
    assert np.all(np.diff(ranks[order]) >= 0)


def test_allocate_ranks_rejects_impossible_budget():
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks([1, 2, 3], mean_rank=20, r_max=16)
    with pytest.raises(ValueError, match="errors"):
        allocate_ranks([1, -2], mean_rank=2, r_max=4)


# ----------------------------------------------------------------------------- error and mask


def test_reconstruction_error_hand_case_and_channel_scale_invariance():
    dense = jnp.array([[3.0, 0.0], [4.0, 2.0]])
    sparse = jnp.array([[3.0, 0.0], [0.0, 2.0]])
    assert float(reconstruction_error(dense, sparse)) == pytest.approx((16 / 25 + 0) / 2)
    scale = jnp.array([10.0, 0.1])
    assert float(reconstruction_error(dense * scale, sparse * scale)) == pytest.approx(0.32)
    assert float(reconstruction_error(dense[None], dense[None])) == 0.0


def test_rank_mask():
    np.testing.assert_array_equal(rank_mask(3, 5), [1, 1, 1, 0, 0])
    traced = jax.jit(rank_mask, static_argnums=1)(jnp.int32(2), 4)
    np.testing.assert_array_equal(traced, [1, 1, 0, 0])
    with pytest.raises(ValueError, match="r_max=4"):
        rank_mask(5, 4)
