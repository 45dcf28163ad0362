"""Local datasets: plain text and prompt/completion JSONL files, tokenised into model rows.

Also home of `rows_to_arrays`, the single place that lays token sequences out as the trainer's
arrays (`inputs`, `targets`, `loss_mask`, `task_ids`, and `segment_ids` for packed rows; see its
docstring), used by `tasks.py` too. `jsonl_rows` is a JSONL file's rows tokenised only when taken,
for per-host loading (`loader.py`); `text_rows` a text file's rows, likewise (a text file is one
document, tokenised in pieces cut at fixed line starts, so a host tokenises its share of the
pieces, not the document: see `text_rows`). A row holds up to `seq_len + 1` tokens: `inputs`
drop the last and `targets` the first, so both have exactly `seq_len` positions. Packed rows
(JSONL examples, text documents) carry `segment_ids`, so the models attend block-diagonally and
restart positions per segment, and the loss mask never predicts a token of another segment.
No downloading: every host parses a JSONL file whole, and reads of a text file only the pieces
it tokenises; shuffling and batching live in `loader.py`.
"""

from __future__ import annotations

import json
import os
import re
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


PIECE_BYTES = 1 << 14  # a text document is tokenised in pieces of about this many bytes

# Where a piece may end (the first of these at or after each multiple of the piece size): at
# the start of a line that begins with a non-space, after a line ending in one; else (a line
# longer than a piece) before a single space between two non-spaces; else at a character start
# (never inside a UTF-8 character, nor between the two bytes of a CRLF).
_LINE_START = re.compile(rb"(?:(?<=[^\s]\n)|(?<=[^\s]\r\n))(?=[^\s])")
_WORD_START = re.compile(rb"(?<=[^\s])(?= [^\s])")
_CHAR_START = re.compile(rb"(?=[^\x80-\xbf\n])|(?<!\r)(?=\n)")


def _find_cut(f, lo: int, hi: int, size: int) -> int:
    """Where the piece that starts in the window [lo, end = min(hi, size)) of the open binary
    file `f` (of `size` bytes) starts: the window's first line start (`_LINE_START`), else, in a
    whole window (hi <= size), its first word start, else character; else `end` (in the last,
    partial window: the file's last piece is empty). Reads from `lo` on in growing chunks, and
    at most the window when its lines are longer than the window."""
    start, end = max(lo - 3, 0), min(hi, size)  # the lookbehinds see up to 3 bytes before lo
    f.seek(start)
    buf, chunk = b"", 512
    while True:
        buf += f.read(min(end, start + chunk) - start - len(buf))
        found = _LINE_START.search(buf, lo - start)
        if found:
            return start + found.start()
        if start + len(buf) >= end:
            break
        chunk *= 4
    for pattern in (_WORD_START, _CHAR_START) if hi <= size else ():
        found = pattern.search(buf, lo - start)
        if found:
            return start + found.start()
    return end


def text_rows(paths: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, *,
              process_index: int = 0, process_count: int = 1,
              allgather: Callable[[np.ndarray], np.ndarray] | None = None,
              piece_bytes: int | None = None) -> Rows:
    """The rows of `load_text(...)` (same arguments), each tokenised only when taken.

    A document is tokenised in pieces, at fixed places that depend on the file alone: with
    K = `piece_bytes` (default `PIECE_BYTES`, 16 KiB), a document of S bytes has ceil(S / K)
    pieces, and piece m >= 1 starts at the first line start in bytes m·K .. (m + 1)·K (a line
    that begins with a non-space, after a line that ends in one: `_LINE_START`), so pieces are
    whole lines, under 2K bytes. Each piece is tokenised alone, and the document's tokens are
    its pieces' tokens concatenated, then EOS. A document of at most K bytes is one piece: its
    tokens are `encode(text) + [EOS]`, as when tokenised whole. Only where no line starts in
    those K bytes (long lines) is a line cut (before a space between two words, else at a
    character; never in a CRLF), except in the last K bytes, where the document's last piece is
    then empty. GPT-2's byte-level BPE gives exactly the whole document's tokens at line and
    word starts (its pre-tokenizer splits there before merging); a sentencepiece tokenizer
    marks the start of each text it is given, so about one token per piece may differ.
    Files are read as UTF-8 with universal newlines (CRLF and CR are LF), as `open` reads text.

    Process p tokenises its contiguous share of the pieces, pieces n·p / count .. n·(p + 1) /
    count of all n (the documents' pieces in order), keeps their tokens, and `allgather(counts
    int32 (n_local,)) -> (n,)` (the concatenation over processes in process order; not needed
    for one process) gives every piece's token count, so every process has the rows one process
    would. `take(indices)` tokenises the pieces those rows cover outside the share (once per
    call), reading only their bytes; a host holds its share's tokens and a few ints per piece.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    k = PIECE_BYTES if piece_bytes is None else int(piece_bytes)
    if k < 4:
        raise ValueError(f"piece_bytes={k}; a piece needs at least 4 bytes (a UTF-8 character).")
    sizes = [os.path.getsize(p) for p in paths]
    counts = [max(1, -(-size // k)) for size in sizes]  # pieces per document
    doc_of = np.repeat(np.arange(len(paths), dtype=np.int32), counts)  # each piece's document
    first = np.cumsum([0] + counts)  # each document's first piece
    n = int(first[-1])
    cuts = np.full(n, -1, np.int64)  # each piece's first byte in its file, found when needed

    def bound(f, d, m):  # where piece m of document d (open as f) starts
        if m == 0 or m == counts[d]:
            return 0 if m == 0 else sizes[d]
        i = first[d] + m
        if cuts[i] < 0:
            cuts[i] = _find_cut(f, m * k, (m + 1) * k, sizes[d])
        return int(cuts[i])

    def encode(i):
        d = doc_of[i]
        path, m = paths[d], i - first[d]
        with open(path, "rb") as f:  # one open per piece: its two cuts, then its bytes
            lo, hi = bound(f, d, m), bound(f, d, m + 1)
            f.seek(lo)
            data = f.read(hi - lo)
        try:
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text at byte {lo + e.start} ({e.reason}); "
                             "save the file as UTF-8.") from None
        eos = [tokenizer.eos_id] if i + 1 == first[doc_of[i] + 1] else []  # a document's end
        return np.asarray(tokenizer.encode(text) + eos, np.int32)

    share = range(n * process_index // process_count, n * (process_index + 1) // process_count)
    cache = {i: encode(i) for i in share}
    lengths = np.asarray([len(cache[i]) for i in share], np.int32)
    if process_count > 1:
        lengths = np.asarray(allgather(lengths))
    if lengths.shape != (n,):
        raise ValueError(f"allgather returned {lengths.shape} token counts for the {n} pieces "
                         f"of {paths}; it must concatenate every process's counts in order.")
    ends = np.cumsum(lengths, dtype=np.int64)  # each piece's end in the stream
    total = int(ends[-1])
    if total < 2:
        raise ValueError(f"text files {paths} hold no text; pass at least one non-empty file.")

    def make(indices):
        other: dict[int, np.ndarray] = {}  # pieces outside the share, tokenised once per call

        def piece(i):
            if i not in cache and i not in other:
                other[i] = encode(i)
            return cache[i] if i in cache else other[i]

        rows, segments = [], []
        for s in np.asarray(indices, np.int64) * seq_len:
            a, b = np.searchsorted(ends, [s, min(s + seq_len, total - 1)], side="right")
            tokens = np.concatenate([piece(i) for i in range(a, b + 1)])
            docs = np.repeat(doc_of[a:b + 1], lengths[a:b + 1])
            offset = s - (ends[a] - lengths[a])
            rows.append(tokens[offset:offset + seq_len + 1])
            doc = docs[offset:offset + seq_len + 1]
            segments.append(doc - doc[0] + 1)
        flags = [np.ones(len(row), bool) for row in rows]
        return rows_to_arrays(rows, flags, [0] * len(rows), seq_len, tokenizer.pad_id, segments)

    return Rows(-(-(total - 1) // seq_len),
                ("inputs", "targets", "loss_mask", "task_ids", "segment_ids"), make)


def load_text(paths: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, *,
              piece_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Tokenises plain text files into packed rows, loss on every token within a document.

    Each file is one document; documents are concatenated into one stream
    `doc_1 EOS doc_2 EOS ...` cut into rows of `seq_len + 1` tokens that overlap by one, so
    every stream token is a target exactly once, except each document's first token (nothing of
    its own document precedes it). The last row is padded. A row's `segment_ids` number the
    documents (or their pieces) it holds, from 1. A document is tokenised in pieces of about
    `piece_bytes` (default `PIECE_BYTES`), cut at line starts: see `text_rows`.

    Returns:
        The `rows_to_arrays` dict with `segment_ids`, N = ceil((stream_length - 1) / seq_len);
        `task_ids` all 0.
    """
    rows = text_rows(paths, tokenizer, seq_len, piece_bytes=piece_bytes)
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
