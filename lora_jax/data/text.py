"""Local datasets: plain text and prompt/completion JSONL files, tokenised into model rows.

Also home of `rows_to_arrays`, the single place that lays token sequences out as the trainer's
arrays (`inputs`, `targets`, `loss_mask`, `task_ids`, and `segment_ids` for packed rows; see its
docstring), used by `tasks.py` too. `jsonl_rows` is a JSONL file's rows tokenised only when taken,
for per-host loading (`loader.py`); `text_rows` a text file's rows, cut out of its token stream
when taken (a text file is one document, tokenised whole on every host: see `text_rows`). A row
holds up to `seq_len + 1` tokens: `inputs` drop the last and `targets` the first, so both have
exactly `seq_len` positions. Packed rows (JSONL examples, text documents) carry `segment_ids`, so
the models attend block-diagonally and restart positions per segment, and the loss mask never
predicts a token of another segment.
No downloading: every host parses a file whole; shuffling and batching live in `loader.py`.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from lora_jax.data.loader import Rows
from lora_jax.data.tokenizers import Tokenizer


def rows_to_arrays(rows: Sequence[Sequence[int]], loss_flags: Sequence[Sequence[bool]],
                   task_ids: Sequence[int], seq_len: int, pad_id: int,
                   segments: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Lays token rows out as next-token arrays.

    Args:
        rows: N token sequences, each of at most `seq_len + 1` tokens.
        loss_flags: N boolean sequences, same lengths as `rows`; flag j says whether token j,
            when it is a target, counts in the loss (flag 0 is unused: the first token is never
            a target).
        task_ids: N ints.
        seq_len: T.
        pad_id: id written in padded positions of `inputs` and `targets`.
        segments: None, or N int sequences, same lengths as `rows`: token j's segment (1, 2, ...
            in row order; a packed row holds several).

    Returns:
        `inputs` int32 (N, T) = row[:-1] padded, `targets` int32 (N, T) = row[1:] padded,
        `loss_mask` float32 (N, T) = flags[1:] (0 on padding), `task_ids` int32 (N,). With
        `segments` also `segment_ids` int32 (N, T) = segments[:-1] (0 on padding), and
        `loss_mask` is 0 where a target's segment differs from its input's: a packed row never
        predicts across a boundary.
    """
    n = len(rows)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    for i, (row, flags) in enumerate(zip(rows, loss_flags)):
        if len(row) > seq_len + 1:
            raise ValueError(f"row {i} has {len(row)} tokens; at most seq_len + 1 = "
                             f"{seq_len + 1} fit. Raise seq_len to {len(row) - 1}.")
        length = len(row) - 1
        inputs[i, :length] = row[:-1]
        targets[i, :length] = row[1:]
        loss_mask[i, :length] = flags[1:]
        if segments is not None:
            seg = np.asarray(segments[i], np.int32)
            segment_ids[i, :length] = seg[:-1]
            loss_mask[i, :length] *= seg[:-1] == seg[1:]
    out = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
           "task_ids": np.asarray(task_ids, np.int32).reshape(n)}
    return out if segments is None else {**out, "segment_ids": segment_ids}


def text_rows(paths: str | Sequence[str], tokenizer: Tokenizer, seq_len: int) -> Rows:
    """The rows of `load_text(...)` (same arguments), each cut out of the token stream when taken.

    The documents are tokenised whole, here, on every host: a subword tokenizer's tokens near a
    cut depend on the text on both sides of it (and a sentencepiece one marks the start of every
    piece it is given), so tokenising a byte range alone would not give one process's rows. What
    a host keeps is the stream (int32, one per token); `take(indices)` lays out only those rows.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    stream, docs = [], []  # the tokens, and each token's document
    for doc, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            tokens = tokenizer.encode(f.read()) + [tokenizer.eos_id]
        stream.append(np.asarray(tokens, np.int32))
        docs.append(np.full(len(tokens), doc, np.int32))
    stream, docs = np.concatenate(stream), np.concatenate(docs)
    if len(stream) < 2:
        raise ValueError(f"text files {paths} hold no text; pass at least one non-empty file.")

    def make(indices):
        starts = np.asarray(indices, np.int64) * seq_len
        rows = [stream[s:s + seq_len + 1] for s in starts]
        segments = [docs[s:s + seq_len + 1] - docs[s] + 1 for s in starts]
        flags = [np.ones(len(row), bool) for row in rows]
        return rows_to_arrays(rows, flags, [0] * len(rows), seq_len, tokenizer.pad_id, segments)

    return Rows(-(-(len(stream) - 1) // seq_len),
                ("inputs", "targets", "loss_mask", "task_ids", "segment_ids"), make)


def load_text(paths: str | Sequence[str], tokenizer: Tokenizer,
              seq_len: int) -> dict[str, np.ndarray]:
    """Tokenises plain text files into packed rows, loss on every token within a document.

    Each file is one document; documents are concatenated into one stream
    `doc_1 EOS doc_2 EOS ...` cut into rows of `seq_len + 1` tokens that overlap by one, so
    every stream token is a target exactly once, except each document's first token (nothing of
    its own document precedes it). The last row is padded. A row's `segment_ids` number the
    documents (or their pieces) it holds, from 1.

    Returns:
        The `rows_to_arrays` dict with `segment_ids`, N = ceil((stream_length - 1) / seq_len);
        `task_ids` all 0.
    """
    rows = text_rows(paths, tokenizer, seq_len)
    return rows.take(np.arange(rows.num_rows))


def _parse_jsonl_line(line: str, where: str) -> tuple[str, str, int | str | None]:
    """Returns (prompt, completion, task) of one JSONL line; ValueError naming `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object "
                         'like {"prompt": "...", "completion": "..."}.') from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for key in ("prompt", "completion"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; each line needs 'prompt' and "
                             "'completion' strings.")
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, "
                             f"got {type(record[key]).__name__}.")
    task = record.get("task")
    if task is not None and (isinstance(task, bool) or not isinstance(task, (int, str))):
        raise ValueError(f"{where}: 'task' must be an int or a string, "
                         f"got {type(task).__name__}.")
    return record["prompt"], record["completion"], task


def _task_index(tasks: list[int | str | None], task_names: Sequence[str] | None,
                path: str, lines: list[int]) -> list[int]:
    """Maps each example's task field to an int id (absent -> 0, str -> index in names)."""
    named = [t for t in tasks if isinstance(t, str)]
    if named and len(named) != len([t for t in tasks if t is not None]):
        raise ValueError(f"{path}: 'task' mixes ints and strings; use one kind in a file.")
    names = list(task_names) if task_names is not None else sorted(set(named))
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for task, line in zip(tasks, lines):
        if isinstance(task, str) and task not in index:
            raise ValueError(f"{path}:{line}: task {task!r} is not in task_names {names}.")
        if isinstance(task, int) and task < 0:
            raise ValueError(f"{path}:{line}: task id {task} is negative; use ids >= 0.")
        ids.append(0 if task is None else index[task] if isinstance(task, str) else task)
    return ids


def _pack_greedy(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups example indices, in order, into rows of at most `capacity` tokens (whole examples)."""
    rows: list[list[int]] = []
    used = capacity
    for i, length in enumerate(lengths):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def jsonl_rows(path: str, tokenizer: Tokenizer, seq_len: int, *, pack: bool = True,
               task_names: Sequence[str] | None = None, process_index: int = 0,
               process_count: int = 1,
               allgather: Callable[[np.ndarray], np.ndarray] | None = None) -> Rows:
    """The rows of `load_jsonl(...)` (same arguments), each tokenised only when taken.

    Every process parses the file's lines (no tokenising). Packing needs every example's token
    count: process p tokenises its contiguous share of the examples in row order (by task, then
    file order; examples n·p / count .. n·(p + 1) / count), and `allgather(lengths int32
    (n_local,)) -> (n,)` (the concatenation over processes in process order; not needed for one
    process) gives all of them, so every process computes the same rows as one process would.
    `take(indices)` tokenises only those rows' examples (examples of this process's share are
    kept from the first pass). Unpacked (`pack=False`, one example per row), a process's share
    is exactly its `EvalLoader` share, rows n·p / count .. n·(p + 1) / count.
    """
    prompts, completions, tasks, lines = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                prompt, completion, task = _parse_jsonl_line(line, f"{path}:{line_no}")
                prompts.append(prompt), completions.append(completion)
                tasks.append(task), lines.append(line_no)
    if not prompts:
        raise ValueError(f"{path} holds no examples; add lines like "
                         '{"prompt": "...", "completion": "..."}.')
    ids = _task_index(tasks, task_names, path, lines)
    n = len(prompts)
    order = np.argsort(ids, kind="stable")  # the examples in row order: by task, then file order
    lo, hi = n * process_index // process_count, n * (process_index + 1) // process_count
    share = order[lo:hi]
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # this process's share, compact

    def encode(i):
        if i not in cache:
            p, c = tokenizer.encode(prompts[i]), tokenizer.encode(completions[i])
            return (np.asarray([tokenizer.bos_id] + p + c + [tokenizer.eos_id], np.int32),
                    np.arange(len(p) + len(c) + 2) > len(p))
        return cache[i]

    for i in share:
        cache[i] = encode(i)
    gathered = np.asarray([len(cache[i][0]) for i in share], np.int32)
    if process_count > 1:
        gathered = np.asarray(allgather(gathered))
    if gathered.shape != (n,):
        raise ValueError(f"allgather returned {gathered.shape} lengths for the {n} examples of "
                         f"{path}; it must concatenate every process's lengths in order.")
    lengths = np.empty(n, np.int32)
    lengths[order] = gathered
    if (lengths > seq_len + 1).any():
        i = int(np.argmax(lengths > seq_len + 1))
        raise ValueError(
            f"{path}:{lines[i]}: example has {lengths[i]} tokens with BOS and EOS; at most "
            f"seq_len + 1 = {seq_len + 1} fit. Raise seq_len to {lengths[i] - 1} or shorten "
            "the example.")
    plan: list[tuple[int, list[int]]] = []  # (task id, example indices) of each row
    for task_id in sorted(set(ids)):
        group = [i for i in range(n) if ids[i] == task_id]
        packed = (_pack_greedy([int(lengths[i]) for i in group], seq_len + 1) if pack
                  else [[k] for k in range(len(group))])
        plan += [(task_id, [group[k] for k in members]) for members in packed]

    def make(indices):
        rows, flags, segments = [], [], []
        for r in indices:
            examples = [encode(i) for i in plan[r][1]]
            rows.append(np.concatenate([t for t, _ in examples]))
            flags.append(np.concatenate([f for _, f in examples]))
            sizes = [len(t) for t, _ in examples]
            segments.append(np.repeat(np.arange(1, len(sizes) + 1), sizes))
        return rows_to_arrays(rows, flags, [plan[r][0] for r in indices], seq_len,
                              tokenizer.pad_id, segments)

    return Rows(len(plan), ("inputs", "targets", "loss_mask", "task_ids", "segment_ids"), make)


def load_jsonl(path: str, tokenizer: Tokenizer, seq_len: int, *, pack: bool = True,
               task_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tokenises a prompt/completion JSONL file, loss on the completion and its EOS only.

    Each non-empty line is `{"prompt": str, "completion": str}` with an optional "task" (an
    int id, or a name mapped to its index in `task_names`, default the sorted names in the
    file; absent -> 0). An example is `[BOS] prompt completion [EOS]` and must have at most
    `seq_len + 1` tokens. With `pack` (the default), whole examples of the same task are
    concatenated in file order into rows (never split across rows; a row holds one task), and
    `segment_ids` number them 1, 2, ... in the row, so the model sees each alone (block-diagonal
    attention, positions from 0) and the loss predicts within an example only; otherwise one
    example per row, padded (its `segment_ids` 1, padding 0).

    Returns:
        The `rows_to_arrays` dict: `inputs`, `targets`, `segment_ids` int32 (N, T),
        `loss_mask` float32 (N, T), `task_ids` int32 (N,), rows ordered by task id then file
        order (so examples in row-major order, segment by segment, are in that order too).
    """
    rows = jsonl_rows(path, tokenizer, seq_len, pack=pack, task_names=task_names)
    return rows.take(np.arange(rows.num_rows))
