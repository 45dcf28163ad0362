"""Tests for the one-layer pruners and calibration statistics (lora_jax.sparsity.pruners)."""

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.sparsity import (
    calib_stats_from_inputs,
    init_calib_stats,
    magnitude_prune,
    num_pruned,
    sparsegpt_prune,
    update_calib_stats,
    wanda_prune,
)


def _correlated_layer(seed=0, n=512, d_in=64, d_out=16):
    """X = Z C with a mixing matrix C that makes inputs strongly correlated; W random."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d_in))
    mix = np.eye(d_in) + 0.9 * rng.normal(size=(d_in, 4)) @ rng.normal(size=(4, d_in))
    x = z @ mix
    w = rng.normal(size=(d_in, d_out))
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def _pruners(x):
    stats = calib_stats_from_inputs(x)
    return {
        "magnitude": lambda w, s, p=None: magnitude_prune(w, s, p),
        "wanda": lambda w, s, p=None: wanda_prune(w, stats.col_norm_sq, s, p),
        "sparsegpt": lambda w, s, p=None: sparsegpt_prune(w, stats.hessian, s, p, blocksize=16),
    }


def _recon(x, w, w_pruned):
    return float(jnp.linalg.norm(x @ w - x @ w_pruned))


# ----------------------------------------------------------------------------- calibration


def test_calib_stats_batch_by_batch_equals_one_shot():
    x, _ = _correlated_layer(n=96, d_in=8)
    stats = init_calib_stats(8)
    for batch in jnp.split(x, 3):
        stats = update_calib_stats(stats, batch.reshape(4, 8, 8))  # leading axes flattened
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(stats.hessian, 2 * xn.T @ xn / 96, rtol=1e-4)
    np.testing.assert_allclose(stats.col_norm_sq, (xn ** 2).sum(0) / 96, rtol=1e-5)
    assert float(stats.count) == 96


def test_calib_stats_rejects_wrong_width():
    with pytest.raises(ValueError, match="d_in=8"):
        update_calib_stats(init_calib_stats(8), jnp.ones((3, 5)))


# ----------------------------------------------------------------------------- exact sparsity


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_exactly_as_requested(name, sparsity):
    x, w = _correlated_layer()
    w_pruned, mask = _pruners(x)[name](w, sparsity)
    # Wanda prunes floor(s * d_in) in each of the 16 output features, the others
    # floor(s * d_in * d_out) over the layer (0.29 * 1024 = 296.96 -> 296; 0.29 * 64 -> 18).
    expected = num_pruned(64, sparsity) * 16 if name == "wanda" else num_pruned(1024, sparsity)
    assert expected == {0.0: 0, 0.29: 296 if name != "wanda" else 288, 0.5: 512,
                        0.7: 716 if name != "wanda" else 704, 0.9: 921 if name != "wanda"
                        else 912}[sparsity]
    assert int(jnp.sum(w_pruned == 0)) == expected
    assert int(jnp.sum(~mask)) == expected
    assert bool(jnp.all(jnp.where(mask, True, w_pruned == 0)))


def test_wanda_prunes_the_same_count_in_every_output_feature():
    x, w = _correlated_layer()
    _, mask = wanda_prune(w, calib_stats_from_inputs(x).col_norm_sq, 0.3)
    np.testing.assert_array_equal(jnp.sum(~mask, axis=0), np.full(16, 19))


# ----------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_holds_exactly(name, pattern):
    n, m = pattern
    x, w = _correlated_layer()
    w_pruned, mask = _pruners(x)[name](w, None, pattern)
    kept = jnp.sum((w_pruned != 0).reshape(64 // m, m, 16), axis=1)
    np.testing.assert_array_equal(kept, np.full((64 // m, 16), n))
    np.testing.assert_array_equal(jnp.sum(mask.reshape(64 // m, m, 16), axis=1), kept)


def test_nm_accepts_the_matching_sparsity_and_a_list():
    _, w = _correlated_layer()
    a = magnitude_prune(w, 0.5, (2, 4))[1]
    np.testing.assert_array_equal(a, magnitude_prune(w, None, [2, 4])[1])


# ----------------------------------------------------------------------------- zeros first


@pytest.mark.parametrize("pattern", [None, (2, 4)])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_existing_zeros_are_pruned_first(name, pattern):
    x, w = _correlated_layer()
    # Large zeros would be kept by no pruner anyway; make the zeros' neighbours tiny instead,
    # and, for Wanda, zero the norm of input 1 so its nonzero weights tie with the zeros.
    zeros = np.zeros((64, 16), bool)
    zeros[0, :] = True
    zeros[5, 3] = zeros[9, 6] = True
    w = jnp.where(zeros, 0.0, w).at[1, :].set(1e-6)
    x = x.at[:, 1].set(0.0)
    w_pruned, mask = _pruners(x)[name](w, 0.5 if pattern is None else None, pattern)
    assert not bool(jnp.any(mask[zeros]))
    assert int(jnp.sum(w_pruned == 0)) == int(jnp.sum(~mask)) == 512  # zeros counted in the 50%


def test_more_zeros_than_budget_keeps_the_mask_exact():
    w = jnp.zeros((8, 2)).at[0, 0].set(1.0)
    w_pruned, mask = magnitude_prune(w, 0.25)
    assert int(jnp.sum(~mask)) == 4 and not bool(mask[0, 0] is False)
    assert bool(mask[0, 0]) and int(jnp.sum(w_pruned == 0)) == 15


# ----------------------------------------------------------------------------- Wanda vs magnitude


def test_wanda_hand_example_disagrees_with_magnitude():
    # Flax kernel (d_in=4, d_out=2); input 2 is loud, input 3 nearly silent.
    w = jnp.array([[1.0, -4.0],
                   [2.0, 3.0],
                   [0.5, 1.0],
                   [3.0, 2.0]])
    col_norm_sq = jnp.array([1.0, 1.0, 100.0, 0.01])
    # scores |w| * ||X_i||: col 0 -> [1, 2, 5, 0.3]; col 1 -> [4, 3, 10, 0.2]
    _, wanda_mask = wanda_prune(w, col_norm_sq, 0.5)
    np.testing.assert_array_equal(wanda_mask, [[False, True], [True, False],
                                               [True, True], [False, False]])
    _, mag_mask = magnitude_prune(w, 0.5)  # global |w|: prunes 0.5, 1.0, 1.0, 2.0 (stable order)
    np.testing.assert_array_equal(mag_mask, [[False, True], [False, True],
                                             [False, False], [True, True]])


# ----------------------------------------------------------------------------- SparseGPT


def _sparsegpt_numpy(w, hessian, k_per_block, blocksize, percdamp=0.01, nm=None):
    """Float64 loop version of the reference algorithm, torch layout, for cross-checking."""
    wt = np.array(w, np.float64).T
    h = np.array(hessian, np.float64)
    d_out, d_in = wt.shape
    h += percdamp * np.mean(np.diag(h)) * np.eye(d_in)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    keep = np.ones_like(wt, bool)
    for b, i1 in enumerate(range(0, d_in, blocksize)):
        i2 = min(i1 + blocksize, d_in)
        w1, hinv1, err1 = wt[:, i1:i2].copy(), hinv[i1:i2, i1:i2], np.zeros((d_out, i2 - i1))
        if nm is None:
            score = (w1 ** 2 / np.diag(hinv1)[None] ** 2).reshape(-1)
            flat = keep[:, i1:i2].reshape(-1)
            flat[np.argsort(score, kind="stable")[:k_per_block[b]]] = False
            keep[:, i1:i2] = flat.reshape(d_out, i2 - i1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                s = w1[:, i:i + nm[1]] ** 2 / np.diag(hinv1)[i:i + nm[1]][None] ** 2
                low = np.argsort(s, axis=1, kind="stable")[:, :nm[1] - nm[0]]
                np.put_along_axis(keep[:, i1 + i:i1 + i + nm[1]], low, False, axis=1)
            q = np.where(keep[:, i1 + i], w1[:, i], 0.0)
            err1[:, i] = (w1[:, i] - q) / hinv1[i, i]
            w1 -= err1[:, i:i + 1] * hinv1[i:i + 1, :]
            w1[:, i] = q
        wt[:, i1:i2] = w1
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return wt.T, keep.T


@pytest.mark.parametrize("blocksize, counts", [(16, [128] * 4), (24, [192, 192, 128])])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_matches_float64_reference_loop(pattern, blocksize, counts):
    x, w = _correlated_layer()
    hessian = calib_stats_from_inputs(x).hessian
    w_pruned, mask = sparsegpt_prune(w, hessian, 0.5 if pattern is None else None, pattern,
                                     blocksize=blocksize)
    ref_w, ref_mask = _sparsegpt_numpy(w, hessian, counts, blocksize, nm=pattern)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(w_pruned, ref_w, atol=2e-3 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(pattern):
    x, w = _correlated_layer()
    errors = {name: _recon(x, w, prune(w, 0.5 if pattern is None else None, pattern)[0])
              for name, prune in _pruners(x).items()}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]
    assert errors["sparsegpt"] < 0.8 * min(errors["wanda"], errors["magnitude"])


def test_sparsegpt_zero_sparsity_is_identity_and_dead_inputs_are_zeroed():
    x, w = _correlated_layer()
    stats = calib_stats_from_inputs(x)
    w_pruned, mask = sparsegpt_prune(w, stats.hessian, 0.0, blocksize=16)
    np.testing.assert_array_equal(w_pruned, w)
    assert bool(jnp.all(mask))
    dead = calib_stats_from_inputs(x.at[:, 3].set(0.0)).hessian
    w_pruned, mask = sparsegpt_prune(w, dead, 0.25, blocksize=16)
    assert not bool(jnp.any(mask[3])) and bool(jnp.all(w_pruned[3] == 0))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, None])
def test_rejects_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(jnp.ones((4, 4)), sparsity)


def test_rejects_bad_patterns_and_shapes():
    w = jnp.ones((6, 4))
    with pytest.raises(ValueError, match="not divisible by M=4"):
        magnitude_prune(w, None, (2, 4))
    with pytest.raises(ValueError, match="disagrees with pattern"):
        magnitude_prune(jnp.ones((8, 4)), 0.7, (2, 4))
    with pytest.raises(ValueError, match="0 < n <= m"):
        magnitude_prune(jnp.ones((8, 4)), None, (5, 4))
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        wanda_prune(w, jnp.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"expected \(6, 6\)"):
        sparsegpt_prune(w, jnp.eye(4), 0.5)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt_prune(jnp.ones((8, 4)), jnp.eye(8), None, (2, 4), blocksize=6)
    x, w64 = _correlated_layer()  # same shapes as above: reuses the compiled sweep
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(w64, -calib_stats_from_inputs(x).hessian, 0.5, blocksize=16)
    with pytest.raises(ValueError, match="must be \(n, m\) integers"):
        magnitude_prune(jnp.ones((8, 4)), None, (2.0, 4))
    with pytest.raises(ValueError, match="2-D Flax kernel"):
        magnitude_prune(jnp.ones((2, 3, 4)), 0.5)
