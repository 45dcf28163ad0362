"""A stateless, resumable batch iterator over rows materialised on demand (`Rows`).

`ArrayLoader.batch(step)` is a pure function of (seed, step): epoch e = step // steps_per_epoch
uses its own permutation of the N rows (seeded by (seed, e)), batches take consecutive
`global_batch_size` slices of it and the remainder is dropped. Each process gets its
contiguous slice of the global batch, so resuming at step k needs only k, and the slices of
all processes concatenate to the single-process batch. The permutation needs only the row count,
so a process builds only the rows of its own slices (`Rows.take`): with a lazy `Rows` (the
`tasks`, `jsonl`, `text` and `sentences` kinds) each host tokenises only the rows its batches use.

`EvalLoader` splits an eval set instead: process p builds, once, its contiguous share of the rows
(N·p/P to N·(p+1)/P), feeds B / P of them to each global eval batch, and `gather` joins per-row
results of every process back into row order. Turning host arrays into sharded `jax.Array`s is the
trainer's job, not this module's.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import numpy as np


class Rows(Mapping):
    """`num_rows` rows of named arrays, built on demand: `take(indices)` makes only those rows.

    `make(indices int (n,)) -> {name: (n, ...)}` must be a pure function of the indices, so a
    row is the same whichever process builds it and whichever rows it is built with. A dict of
    arrays is `Rows.of(arrays)`. As a mapping (`rows['inputs']`) it is the whole dataset: the
    first lookup builds every row (fine for small data and tests; a training loop uses `take`).

    >>> rows = Rows.of({"x": np.arange(5) * 10})
    >>> rows.num_rows, rows.take([3, 1])["x"].tolist()
    (5, [30, 10])
    """

    def __init__(self, num_rows: int, keys: Iterable[str],
                 make: Callable[[np.ndarray], dict[str, np.ndarray]]):
        self.num_rows, self._keys, self._make = int(num_rows), tuple(keys), make
        self._all: dict[str, np.ndarray] | None = None

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> "Rows":
        """Rows of in-memory arrays sharing their leading size N."""
        if isinstance(arrays, Rows):
            return arrays
        sizes = {k: len(v) for k, v in arrays.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must be a non-empty dict of arrays with one leading "
                             f"size; got leading sizes {sizes}.")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        rows = cls(next(iter(sizes.values())), arrays,
                   lambda idx: {k: v[idx] for k, v in arrays.items()})
        rows._all = arrays
        return rows

    def take(self, indices) -> dict[str, np.ndarray]:
        """Returns name -> (len(indices), ...): the rows `indices`, in that order."""
        return self._make(np.asarray(indices, np.int64).reshape(-1))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        if self._all is None:
            self._all = self.take(np.arange(self.num_rows))
        return self._all[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ArrayLoader:
    """Batches of rows of `arrays` (`Rows`, or a dict of arrays sharing the leading dim N).

    Args:
        arrays: `Rows`, or name -> array of shape (N, ...); only the rows of this process's
            batches are ever built (`Rows.take`).
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
        self.rows = Rows.of(arrays)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                             "need process_count >= 1 and 0 <= process_index < process_count.")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive "
                             f"multiple of process_count={process_count}; use e.g. "
                             f"{max(1, global_batch_size // process_count) * process_count}.")
        self.num_rows = self.rows.num_rows
        if global_batch_size > self.num_rows:
            raise ValueError(f"global_batch_size={global_batch_size} exceeds the "
                             f"{self.num_rows} rows; lower it or add data.")
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
        return self.rows.take(self.batch_indices(step))


class EvalLoader:
    """An eval set split over processes: process p holds rows N·p/P .. N·(p+1)/P, built once.

    Global eval batch k is every process's rows k·b .. (k+1)·b of its share (b = B / P), in
    process order; a share shorter than the others' is padded by wrapping around within itself
    (process p builds no row outside its share, except row 0 when its share is empty, N < P).
    With one process, batch k is rows k·B .. (k+1)·B, the last one wrapped around to row 0.
    Per-row results of the real rows (`keep(k)` of each local batch), concatenated over the
    batches and `gather`ed, are in row order: the same numbers, in the same order, as one process
    would have.

    Args:
        rows: the eval set (`Rows`, built only when taken, or a dict of arrays (N, ...)).
        global_batch_size: B, rows per eval step over all processes; a multiple of process_count.
        process_index, process_count: this process's share.
        allgather: `(x (n_local,)) -> (n,)`, the concatenation of every process's `x` in
            process order (sizes may differ by process); not needed for one process.

    >>> evals = EvalLoader({"x": np.arange(5)}, global_batch_size=4)
    >>> evals.num_batches, evals.batch(1)["x"].tolist(), evals.keep(1)
    (2, [4, 0, 1, 2], 1)
    """

    def __init__(self, rows: Mapping[str, np.ndarray], global_batch_size: int, *,
                 process_index: int = 0, process_count: int = 1,
                 allgather: Callable[[np.ndarray], np.ndarray] | None = None):
        rows = Rows.of(rows)
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(f"eval global_batch_size={global_batch_size} must be a positive "
                             f"multiple of process_count={process_count}; use e.g. "
                             f"{max(1, global_batch_size // process_count) * process_count}.")
        if process_count > 1 and allgather is None:
            raise ValueError(f"process_count={process_count} needs allgather (e.g. the "
                             "trainer's, over jax's process_allgather).")
        n, b = rows.num_rows, global_batch_size // process_count
        lo, hi = n * process_index // process_count, n * (process_index + 1) // process_count
        self.num_rows, self.global_batch_size, self.local_batch_size = n, global_batch_size, b
        self.num_local = hi - lo
        largest = -(-n // process_count)  # ceil(N / P): the longest share
        self.num_batches = -(-largest // b)
        self.rows = rows.take(np.arange(lo, hi) if hi > lo else [0])  # the share, built once
        self._allgather = allgather if process_count > 1 else None

    def keep(self, k: int) -> int:
        """How many leading rows of local batch `k` are real (the rest is padding)."""
        return int(np.clip(self.num_local - k * self.local_batch_size, 0,
                           self.local_batch_size))

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Returns this process's slice of global eval batch `k`: name -> (B / P, ...)."""
        idx = (k * self.local_batch_size + np.arange(self.local_batch_size)) % max(
            self.num_local, 1)
        return {key: v[idx] for key, v in self.rows.items()}

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Per-row results of this process's real rows (`num_local`,) -> every row's (N,), in row
        order (a collective: every process calls it)."""
        x = np.asarray(x)
        if len(x) != self.num_local:
            raise ValueError(f"{len(x)} results for the {self.num_local} rows of this share.")
        return x if self._allgather is None else np.asarray(self._allgather(x))
