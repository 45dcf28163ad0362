"""Built-in synthetic tasks for decoder LMs: (prompt, answer) text pairs, generated on the fly.

Each family in `TASKS` samples one (prompt, answer) pair from a numpy Generator. Most families
mark their operation in the prompt ("rev abc=" -> "cba"); the `digits_*` families deliberately
share one prompt format ("4713=") and differ only in the answer, so in multi-task training
the task id is the only thing that tells them apart (conflicting tasks). `make_task_dataset`
turns families into the trainer's arrays with completion-only loss (`task_rows` into rows tokenised
only when taken, for per-host loading), with train and eval
prompts kept disjoint by a stable hash of the prompt (a prompt used for eval never appears in
training, under any task). Scoring helpers (`exact_match`, `per_task_accuracy`) live here too.
Model-specific decoding and metrics logging do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Callable, Sequence

import numpy as np

from lora_jax.data.loader import Rows
from lora_jax.data.text import rows_to_arrays
from lora_jax.data.tokenizers import ByteTokenizer, Tokenizer

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
EVAL_FRACTION = 0.2  # share of all possible prompts reserved for the eval split


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """A named generator of (prompt, answer) strings; `example` shows one pair."""

    name: str
    sample: Callable[[np.random.Generator], tuple[str, str]]
    example: str


def _digits(rng: np.random.Generator, lo: int, hi: int) -> str:
    """Returns a string of lo..hi random decimal digits."""
    return "".join(str(d) for d in rng.integers(0, 10, rng.integers(lo, hi + 1)))


def _letters(rng: np.random.Generator, lo: int, hi: int) -> str:
    """Returns a string of lo..hi random lowercase letters."""
    return "".join(rng.choice(_LETTERS, rng.integers(lo, hi + 1)))


def _number(rng: np.random.Generator, max_digits: int) -> int:
    """Returns an int with a uniform number of digits in 1..max_digits, uniform within it."""
    n = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if n == 1 else 10 ** (n - 1), 10 ** n))


def _copy(rng):
    s = _letters(rng, 3, 8)
    return f"cp {s}=", s


def _reverse(rng):
    s = _letters(rng, 3, 8)
    return f"rev {s}=", s[::-1]


def _sort(rng):
    s = _letters(rng, 3, 8)
    return f"sort {s}=", "".join(sorted(s))


def _add(rng):
    a, b = _number(rng, 5), _number(rng, 5)
    return f"{a}+{b}=", str(a + b)


def _modular(rng):
    m = int(rng.integers(2, 20))
    a, b = int(rng.integers(0, 100)), int(rng.integers(0, 100))
    op = str(rng.choice(["+", "-", "*"]))
    value = {"+": a + b, "-": a - b, "*": a * b}[op] % m
    return f"mod{m} {a}{op}{b}=", str(value)


def _key_value(rng):
    n = int(rng.integers(2, 7))
    keys = rng.choice(_LETTERS, n, replace=False)
    values = rng.integers(0, 10, n)
    query = int(rng.integers(0, n))
    pairs = "".join(f"{k}{v}" for k, v in zip(keys, values))
    return f"{pairs}?{keys[query]}=", str(values[query])


def _digits_task(answer: Callable[[str], str]):
    """Returns a sampler of bare 3..8-digit prompts "4713=" answered by `answer(digits)`."""

    def sample(rng):
        d = _digits(rng, 3, 8)
        return f"{d}=", answer(d)

    return sample


TASKS: dict[str, TaskFamily] = {f.name: f for f in [
    TaskFamily("copy", _copy, "cp qxbe= -> qxbe"),
    TaskFamily("reverse", _reverse, "rev qxbe= -> ebxq"),
    TaskFamily("sort", _sort, "sort qxbe= -> beqx"),
    TaskFamily("add", _add, "4713+98= -> 4811"),
    TaskFamily("modular", _modular, "mod7 57*38= -> 5"),
    TaskFamily("kv_recall", _key_value, "a3c7f1?c= -> 7"),
    TaskFamily("digits_reverse", _digits_task(lambda d: d[::-1]), "4713= -> 3174"),
    TaskFamily("digits_sort", _digits_task(lambda d: "".join(sorted(d))), "4713= -> 1347"),
    TaskFamily("digits_sort_desc", _digits_task(lambda d: "".join(sorted(d))[::-1]),
               "4713= -> 7431"),
    TaskFamily("digits_rotate", _digits_task(lambda d: d[1:] + d[0]), "4713= -> 7134"),
]}


def task_names() -> list[str]:
    """Returns the names of the built-in task families."""
    return list(TASKS)


def is_eval_prompt(prompt: str) -> bool:
    """Returns whether `prompt` belongs to the eval split (stable hash, ~EVAL_FRACTION)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return h % 10_000 < EVAL_FRACTION * 10_000


def sample_pairs(task: str, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Returns n (prompt, answer) pairs of `task` whose prompts belong to `split`.

    Deterministic in (task, split, n, seed) and independent of which other tasks are drawn.
    """
    family = _family(task)
    want_eval = split == "eval"
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), int(want_eval)])
    pairs = []
    for _ in range(100 * n + 1000):
        if len(pairs) == n:
            return pairs
        prompt, answer = family.sample(rng)
        if is_eval_prompt(prompt) == want_eval:
            pairs.append((prompt, answer))
    if len(pairs) == n:
        return pairs
    raise RuntimeError(f"task {task!r}: found only {len(pairs)} of {n} {split} prompts; the "
                       "family has too few distinct prompts for this split.")


def task_rows(tasks: Sequence[str], split: str, n_per_task: int, seed: int, seq_len: int = 32,
              tokenizer: Tokenizer | None = None) -> Rows:
    """The rows of `make_task_dataset(...)` (same arguments), each tokenised only when taken.

    The (prompt, answer) strings are drawn up front (cheap); `take(indices)` tokenises only those
    rows, so a host that takes only its batches' rows tokenises only them. The longest example
    of each task is tokenised here, so a too-short `seq_len` fails at once.
    """
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is not 'train' or 'eval'.")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {list(tasks)} must be non-empty and without repeats.")
    if n_per_task < 1:
        raise ValueError(f"n_per_task={n_per_task}; it must be >= 1.")
    for task in tasks:
        _family(task)
    pairs, ids = [], []
    for task_id, task in enumerate(tasks):
        pairs += sample_pairs(task, split, n_per_task, seed)
        ids += [task_id] * n_per_task

    def encode(i):
        (prompt, answer), task = pairs[i], tasks[ids[i]]
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
        tokens = [tokenizer.bos_id] + p + a + [tokenizer.eos_id]
        if len(tokens) > seq_len + 1:
            raise ValueError(
                f"task {task!r}: example {prompt + answer!r} has {len(tokens)} tokens with "
                f"BOS and EOS, needs seq_len >= {len(tokens) - 1} (got {seq_len}).")
        return tokens, [False] * (1 + len(p)) + [True] * (len(a) + 1)

    def make(indices):
        rows, flags = zip(*(encode(i) for i in indices)) if len(indices) else ((), ())
        return rows_to_arrays(rows, flags, [ids[i] for i in indices], seq_len, tokenizer.pad_id)

    chars = lambda i: len(pairs[i][0]) + len(pairs[i][1])
    for t in range(len(tasks)):  # fail early on the longest example of each task
        encode(max(range(t * n_per_task, (t + 1) * n_per_task), key=chars))
    return Rows(len(pairs), ("inputs", "targets", "loss_mask", "task_ids"), make)


def make_task_dataset(tasks: Sequence[str], split: str, n_per_task: int, seed: int,
                      seq_len: int = 32, tokenizer: Tokenizer | None = None
                      ) -> dict[str, np.ndarray]:
    """Builds a multi-task dataset of `[BOS] prompt answer [EOS]` examples.

    Args:
        tasks: task names (keys of `TASKS`); `task_ids` index into this sequence.
        split: 'train' or 'eval'; their prompts never overlap.
        n_per_task: examples per task (sampled with replacement within the split).
        seed: generator seed; the output is a pure function of all arguments.
        seq_len: T; each example's `[BOS] prompt answer [EOS]` must have at most T + 1 tokens.
        tokenizer: defaults to `ByteTokenizer()`.

    Returns:
        `inputs`, `targets` int32 (N, T), `loss_mask` float32 (N, T) (1 on answer and final
        EOS targets), `task_ids` int32 (N,), with N = len(tasks) * n_per_task in task order.
    """
    rows = task_rows(tasks, split, n_per_task, seed, seq_len, tokenizer)
    return rows.take(np.arange(rows.num_rows))


def _family(task: str) -> TaskFamily:
    """Returns the family named `task`, or a ValueError listing the valid names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {task_names()}.")
    return TASKS[task]


def exact_match(logits_argmax: np.ndarray, targets: np.ndarray,
                loss_mask: np.ndarray) -> np.ndarray:
    """Returns bool (N,): prediction == target at every position where loss_mask > 0.

    With teacher forcing this equals greedy decoding of the answer. Inputs are (N, T); a row
    without any loss position counts as correct.
    """
    if not np.shape(logits_argmax) == np.shape(targets) == np.shape(loss_mask):
        raise ValueError(f"shapes differ: logits_argmax {np.shape(logits_argmax)}, targets "
                         f"{np.shape(targets)}, loss_mask {np.shape(loss_mask)}; pass (N, T) "
                         "each (argmax over the vocab axis first).")
    ok = (np.asarray(logits_argmax) == np.asarray(targets)) | (np.asarray(loss_mask) <= 0)
    return ok.all(axis=-1)


def per_task_accuracy(correct: np.ndarray, task_ids: np.ndarray,
                      tasks: Sequence[str]) -> dict[str, float]:
    """Returns {task name: accuracy} for `correct` bool (N,) and `task_ids` int (N,).

    'mean' is the unweighted mean over tasks that have examples; a task without examples
    maps to nan.
    """
    correct, task_ids = np.asarray(correct, bool), np.asarray(task_ids)
    if correct.shape != task_ids.shape or correct.ndim != 1:
        raise ValueError(f"correct {correct.shape} and task_ids {task_ids.shape} must both "
                         "be (N,).")
    if task_ids.size and (task_ids.min() < 0 or task_ids.max() >= len(tasks)):
        raise ValueError(f"task_ids span [{task_ids.min()}, {task_ids.max()}] but only "
                         f"{len(tasks)} task names were given: {list(tasks)}.")
    result = {}
    for i, name in enumerate(tasks):
        hits = correct[task_ids == i]
        result[name] = float(hits.mean()) if hits.size else float("nan")
    present = [v for v in result.values() if not np.isnan(v)]
    result["mean"] = float(np.mean(present)) if present else float("nan")
    return result
