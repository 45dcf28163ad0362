"""A stateless, resumable batch iterator over in-memory arrays.

`ArrayLoader.batch(step)` is a pure function of (seed, step): epoch e = step // steps_per_epoch
uses its own permutation of the N rows (seeded by (seed, e)), batches take consecutive
`global_batch_size` slices of it and the remainder is dropped. Each process gets its
contiguous slice of the global batch, so resuming at step k needs only k, and the slices of
all processes concatenate to the single-process batch. Turning host arrays into sharded
`jax.Array`s is the trainer's job, not this module's.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class ArrayLoader:
    """Batches of rows of `arrays` (dict of arrays sharing the leading dim N).

    Args:
        arrays: name -> array of shape (N, ...).
        global_batch_size: B, rows per step over all processes; must divide by process_count.
        seed: seed of the per-epoch permutations.
        shuffle: if False, every epoch walks the rows in order.
        process_index, process_count: this process's slice of each global batch.

    >>> loader = ArrayLoader({"x": np.arange(10)}, global_batch_size=4, seed=0)
    >>> loader.steps_per_epoch, loader.batch(0)["x"].shape
    (2, (4,))
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int, *,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must be a non-empty dict of arrays with one leading "
                             f"size; got leading sizes {sizes}.")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                             "need process_count >= 1 and 0 <= process_index < process_count.")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                             f"multiple of process_count={process_count}; use e.g. "
                             f"{max(1, global_batch_size // process_count) * process_count}.")
        self.num_rows = next(iter(sizes.values()))
        if global_batch_size > self.num_rows:
            raise ValueError(f"global_batch_size={global_batch_size} exceeds the "
                             f"{self.num_rows} rows; lower it or add data.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self._cached_order: tuple[int, np.ndarray] | None = None  # (epoch, order), speed only

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the remainder rows are dropped)."""
        return self.num_rows // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Returns int (N,): the row order of `epoch`, a pure function of (seed, epoch)."""
        if self._cached_order is None or self._cached_order[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def batch_indices(self, step: int) -> np.ndarray:
        """Returns int (B / process_count,): the rows this process reads at `step`."""
        if step < 0:
            raise ValueError(f"step={step}; steps start at 0.")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size + self.process_index * self.local_batch_size
        return self.epoch_order(epoch)[start:start + self.local_batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns this process's slice of global batch `step`: name -> (B / count, ...)."""
        indices = self.batch_indices(step)
        return {k: v[indices] for k, v in self.arrays.items()}
