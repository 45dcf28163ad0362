"""Image tasks on the bundled digits: the file, the views, the split, determinism, errors."""

import numpy as np
import pytest

from lora_jax.data import images as im


def test_bundled_digits_are_the_1797_sklearn_images():
    raw, labels = im.load_digits()
    assert raw.shape == (1797, 8, 8) and raw.dtype == np.uint8 and labels.shape == (1797,)
    assert raw.min() == 0 and raw.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert not raw.flags.writeable  # the cached arrays cannot be modified by a caller


def test_eval_split_is_stratified_and_disjoint_across_views():
    mask = im.eval_mask()
    _, labels = im.load_digits()
    for c in range(10):
        share = mask[labels == c].mean()
        assert abs(share - im.EVAL_FRACTION) < 0.01
    train = im.make_image_dataset(["plain_all"], "train")
    held = im.make_image_dataset(["plain_all"], "eval")
    assert len(train["labels"]) + len(held["labels"]) == 1797
    # No eval image appears in training, in any view: compare the raw pixels.
    seen = {x.tobytes() for x in train["images"]}
    assert not any(x.tobytes() in seen for x in held["images"] if x.any())


def test_views_classes_and_task_ids():
    tasks = ["plain_0to4", "rot90_0to4", "invert_5to9", "shift_all"]
    data = im.make_image_dataset(tasks, "eval")
    assert data["images"].shape[1:] == (8, 8, 1) and data["images"].dtype == np.float32
    assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0
    ids, labels, x = data["task_ids"], data["labels"], data["images"][..., 0]
    assert sorted(set(ids.tolist())) == [0, 1, 2, 3]
    assert set(labels[ids == 0]) == {0, 1, 2, 3, 4} and set(labels[ids == 2]) == {5, 6, 7, 8, 9}
    np.testing.assert_array_equal(x[ids == 1], np.rot90(x[ids == 0], 1, axes=(1, 2)))
    plain_5to9 = im.make_image_dataset(["plain_5to9"], "eval")["images"][..., 0]
    np.testing.assert_allclose(x[ids == 2], 1.0 - plain_5to9)
    shifted = x[ids == 3]
    assert not shifted[:, :2].any() and not shifted[:, :, :2].any()


def test_limit_is_a_deterministic_subset():
    a = im.make_image_dataset(["shift_0to4", "plain_5to9"], "train", limit=50, seed=3)
    b = im.make_image_dataset(["plain_5to9"], "train", limit=50, seed=3)
    assert len(a["labels"]) == 100
    # A task's subset does not depend on which other tasks are drawn with it.
    np.testing.assert_array_equal(a["images"][a["task_ids"] == 1], b["images"])
    c = im.make_image_dataset(["plain_5to9"], "train", limit=50, seed=4)
    assert not np.array_equal(b["images"], c["images"])


def test_accuracy():
    logits = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert im.accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="labels"):
        im.accuracy(logits, np.array([1, 0]))


@pytest.mark.parametrize("tasks,split,match", [
    (["blur_0to4"], "train", "valid tasks"),
    (["plain_0to3"], "train", "valid tasks"),
    (["plain_all"], "test", "split"),
    (["plain_all", "plain_all"], "train", "repeats"),
])
def test_errors_name_the_bad_input(tasks, split, match):
    with pytest.raises(ValueError, match=match):
        im.make_image_dataset(tasks, split)
