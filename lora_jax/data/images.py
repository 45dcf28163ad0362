"""Built-in image tasks on the 8x8 handwritten digits shipped with lora_jax (`digits.npz`).

A task id is `'{view}_{classes}'`: a view of the images (`plain`; `rot90`, turned a quarter
counter-clockwise; `shift`, moved 2 pixels right and down with zero fill; `invert`, 16 − pixel)
and a class subset (`0to4`, `5to9`, `all`). The base task is `plain_0to4`; the held-out
adaptation tasks (`HELD_OUT`) are views or classes the base never sees. Labels are always the
digit itself (0..9), so one 10-way head serves every task. The split is by image, not by task: a
fixed 20% of the 1,797 images is the eval split of every task, so an image used for eval never
appears in training under any view. Pixels become float32 in [0, 1], channels-last (N, 8, 8, 1).
Everything is deterministic numpy; training, models and text tasks live elsewhere.
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Callable, Sequence

import numpy as np

EVAL_FRACTION = 0.2
SPLIT_SEED = 20240518  # fixes which images are eval; changing it changes every published number
IMAGE_SIZE = 8
BASE_TASK = "plain_0to4"
HELD_OUT = ("plain_5to9", "rot90_0to4", "shift_0to4", "invert_0to4")


def _shift(images: np.ndarray, by: int = 2) -> np.ndarray:
    out = np.zeros_like(images)
    out[:, by:, by:] = images[:, :-by, :-by]
    return out


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "plain": lambda x: x,
    "rot90": lambda x: np.rot90(x, k=1, axes=(1, 2)),
    "shift": _shift,
    "invert": lambda x: 16 - x,
}
CLASSES: dict[str, tuple[int, ...]] = {
    "0to4": (0, 1, 2, 3, 4),
    "5to9": (5, 6, 7, 8, 9),
    "all": tuple(range(10)),
}


def task_names() -> list[str]:
    """Returns every image task id, `'{view}_{classes}'`."""
    return [f"{v}_{c}" for v in VIEWS for c in CLASSES]


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns the raw digits: images uint8 (1797, 8, 8) in 0..16 and labels uint8 (1797,).

    Read-only arrays; the file's origin and licence are in `DIGITS_LICENSE.txt` beside it.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; regenerate it with scikit-learn installed: "
                                "python lora_jax/data/make_digits.py")
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def eval_mask() -> np.ndarray:
    """Returns bool (1797,): True for the fixed eval images, EVAL_FRACTION of every digit."""
    _, labels = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    flags = np.zeros(len(labels), bool)
    for c in range(10):  # stratified: the same share of every digit is held out
        rows = order[labels[order] == c]
        flags[rows[:int(round(EVAL_FRACTION * len(rows)))]] = True
    return flags


def _parse(task: str) -> tuple[str, tuple[int, ...]]:
    view, _, classes = task.partition("_")
    if view not in VIEWS or classes not in CLASSES:
        raise ValueError(f"unknown image task {task!r}; valid tasks: {task_names()}.")
    return view, CLASSES[classes]


def make_image_dataset(tasks: Sequence[str], split: str, *, limit: int | None = None,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Builds a multi-task image classification dataset.

    Args:
        tasks: task ids (see `task_names()`); `task_ids` index into this sequence.
        split: 'train' or 'eval'; the two never share an image, under any view.
        limit: at most this many examples per task (a seeded subset: few-shot adaptation).
        seed: seed of the subset when `limit` is set; unused otherwise.

    Returns:
        `images` float32 (N, 8, 8, 1) in [0, 1], `labels` int32 (N,) (the digit),
        `task_ids` int32 (N,), rows in task order and, within a task, in image order.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is not 'train' or 'eval'.")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {list(tasks)} must be non-empty and without repeats.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}; it must be >= 1 or None.")
    raw, labels = load_digits()
    in_split = eval_mask() == (split == "eval")
    out = {"images": [], "labels": [], "task_ids": []}
    for task_id, task in enumerate(tasks):
        view, classes = _parse(task)
        rows = np.flatnonzero(in_split & np.isin(labels, classes))
        if limit is not None and limit < len(rows):
            rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
            rows = np.sort(rng.choice(rows, limit, replace=False))
        out["images"].append(VIEWS[view](raw[rows]))
        out["labels"].append(labels[rows].astype(np.int32))
        out["task_ids"].append(np.full(len(rows), task_id, np.int32))
    batch = {k: np.concatenate(v) for k, v in out.items()}
    batch["images"] = (batch["images"].astype(np.float32) / 16.0)[..., None]
    return batch


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Returns the share of rows whose argmax over logits (N, classes) equals labels (N,)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {logits.shape} must be (N, classes) and labels {labels.shape} "
                         "(N,).")
    return float((logits.argmax(-1) == labels).mean())
