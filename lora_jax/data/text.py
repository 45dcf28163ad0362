"""Local datasets: plain text and prompt/completion JSONL files, tokenised into model rows.

Also home of `rows_to_arrays`, the single place that lays token sequences out as the trainer's
arrays (`inputs`, `targets`, `loss_mask`, `task_ids`, and `segment_ids` for packed rows; see its
docstring), used by `tasks.py` too, and of `shard_rows`, which gives each host its rows. A row
holds up to `seq_len + 1` tokens: `inputs` drop the last and `targets` the first, so both have
exactly `seq_len` positions. Packed rows (JSONL examples, text documents) carry `segment_ids`, so
the models attend block-diagonally and restart positions per segment, and the loss mask never
predicts a token of another segment.
No downloading, no streaming: files are read whole; shuffling and batching live in `loader.py`.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

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
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    stream: list[int] = []
    docs: list[int] = []  # each stream token's document
    for doc, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            tokens = tokenizer.encode(f.read()) + [tokenizer.eos_id]
        stream.extend(tokens)
        docs.extend([doc] * len(tokens))
    if len(stream) < 2:
        raise ValueError(f"text files {paths} hold no text; pass at least one non-empty file.")
    starts = range(0, len(stream) - 1, seq_len)
    rows = [stream[s:s + seq_len + 1] for s in starts]
    segments = [[d - docs[s] + 1 for d in docs[s:s + seq_len + 1]] for s in starts]
    flags = [[True] * len(row) for row in rows]
    return rows_to_arrays(rows, flags, [0] * len(rows), seq_len, tokenizer.pad_id, segments)


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
    examples, tasks, lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            prompt, completion, task = _parse_jsonl_line(line, f"{path}:{line_no}")
            p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
            tokens = [tokenizer.bos_id] + p + c + [tokenizer.eos_id]
            if len(tokens) > seq_len + 1:
                raise ValueError(
                    f"{path}:{line_no}: example has {len(tokens)} tokens with BOS and EOS; at "
                    f"most seq_len + 1 = {seq_len + 1} fit. Raise seq_len to "
                    f"{len(tokens) - 1} or shorten the example.")
            flags = [False] * (1 + len(p)) + [True] * (len(c) + 1)
            examples.append((tokens, flags))
            tasks.append(task)
            lines.append(line_no)
    if not examples:
        raise ValueError(f"{path} holds no examples; add lines like "
                         '{"prompt": "...", "completion": "..."}.')
    ids = _task_index(tasks, task_names, path, lines)
    rows, flags, segments, row_tasks = [], [], [], []
    for task_id in sorted(set(ids)):
        group = [ex for ex, i in zip(examples, ids) if i == task_id]
        packed = (_pack_greedy([len(t) for t, _ in group], seq_len + 1) if pack
                  else [[i] for i in range(len(group))])
        for members in packed:
            rows.append([tok for i in members for tok in group[i][0]])
            flags.append([fl for i in members for fl in group[i][1]])
            segments.append([k + 1 for k, i in enumerate(members) for _ in group[i][0]])
            row_tasks.append(task_id)
    return rows_to_arrays(rows, flags, row_tasks, seq_len, tokenizer.pad_id, segments)


def shard_rows(arrays: Mapping[str, np.ndarray], process_index: int,
               process_count: int) -> dict[str, np.ndarray]:
    """Returns this host's rows: row i goes to process i % process_count.

    The rows are first cut to a multiple of `process_count`, so every host gets the same
    number of rows (and thus the same steps per epoch): N_local = N // process_count.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                         "process_count >= 1 and 0 <= process_index < process_count.")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"arrays have different numbers of rows {sizes}; all must match.")
    n = next(iter(sizes.values()), 0) // process_count * process_count
    if n == 0:
        raise ValueError(f"{next(iter(sizes.values()), 0)} rows cannot give each of "
                         f"{process_count} processes a row; use more data or fewer processes.")
    return {k: np.asarray(v)[:n][process_index::process_count] for k, v in arrays.items()}
