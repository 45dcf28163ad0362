"""Tests for lora_jax.data.loader.ArrayLoader: determinism, epochs, process slices."""

import numpy as np
import pytest

from lora_jax.data.loader import ArrayLoader


def _arrays(n=103):
    return {"x": np.arange(n), "y": np.arange(n * 2).reshape(n, 2)}


def test_batch_is_pure_function_of_seed_and_step():
    a, b = ArrayLoader(_arrays(), 8, seed=3), ArrayLoader(_arrays(), 8, seed=3)
    for step in [5, 0, 40, 5]:  # any order, fresh loader = resumed loader
        np.testing.assert_array_equal(a.batch(step)["x"], b.batch(step)["x"])
    assert not np.array_equal(a.batch(0)["x"], ArrayLoader(_arrays(), 8, seed=4).batch(0)["x"])
    batch = a.batch(2)
    np.testing.assert_array_equal(batch["y"][:, 0], 2 * batch["x"])  # rows stay aligned


def test_each_row_once_per_epoch_and_epochs_differ():
    loader = ArrayLoader(_arrays(), 8, seed=0)
    assert loader.steps_per_epoch == 12  # 103 // 8, remainder dropped
    epochs = []
    for e in range(2):
        seen = np.concatenate([loader.batch(e * 12 + s)["x"] for s in range(12)])
        assert len(seen) == len(set(seen.tolist())) == 96
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])


def test_process_slices_concatenate_to_global_batch():
    single = ArrayLoader(_arrays(), 8, seed=1)
    hosts = [ArrayLoader(_arrays(), 8, seed=1, process_index=i, process_count=2)
             for i in range(2)]
    for step in [0, 7, 13]:
        parts = [h.batch(step)["x"] for h in hosts]
        assert all(len(p) == 4 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), single.batch(step)["x"])


def test_no_shuffle_walks_in_order():
    loader = ArrayLoader(_arrays(10), 4, seed=0, shuffle=False)
    np.testing.assert_array_equal(loader.batch(1)["x"], [4, 5, 6, 7])
    np.testing.assert_array_equal(loader.batch(2)["x"], [0, 1, 2, 3])  # epoch 1


def test_errors():
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of "
                                         "process_count=4"):
        ArrayLoader(_arrays(), 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="exceeds the 10 rows"):
        ArrayLoader(_arrays(10), 16, seed=0)
    with pytest.raises(ValueError, match="one leading size"):
        ArrayLoader({"x": np.zeros(4), "y": np.zeros(5)}, 2, seed=0)
    with pytest.raises(ValueError, match="step=-1"):
        ArrayLoader(_arrays(), 8, seed=0).batch(-1)
