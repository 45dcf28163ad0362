"""Data kinds: the one table from `DataConfig.kind` to how its data is read and what it feeds.

A `Kind` says how to check a data config without reading anything (`check`), which local files it
reads (`files`), its tokenizer (`tokenizer`; None for images), an all-zeros example of the model's
first input (`example`, for tracing and init), how to load it (`load -> (train, eval, task
names)`), which batch keys the model takes, in order (`inputs`), what is learned from them
(`objective`), and whether a row is `seq_len` tokens (`tokens`: throughput in tokens/s too):

- `'lm'` (kinds `tasks`, `jsonl`, `text`): `inputs` int32 (N, T), `targets` int32 (N, T),
  `loss_mask` float32 (N, T), `task_ids` int32 (N,); next-token loss, exact-match accuracy.
  `jsonl` and `text` train rows are packed (`jsonl` eval rows hold one example each, so exact
  match is per example) and carry `segment_ids` int32 (N, T) (0 = padding, 1.. = the example or
  document in the row), the model's second input (`GPT2`, `Llama`: attention stays within a
  segment and positions restart at each).
- `'classify'` (kinds `sentences`, `images`): the model's inputs, `labels` int32 (N,) and
  `task_ids` int32 (N,); cross-entropy on the labels, argmax accuracy.
  `sentences` is the sentence-pair task of `sentences.py` (`tokens`, `token_types`, `mask` (N, T);
  its one task is `sentences.TASK`); `images` the digits suite of `images.py` (`images` float32
  (N, 8, 8, 1), tasks `images.task_names()`).

Per-host loading: `load(..., process_index, process_count, allgather)` returns the `tasks`,
`jsonl` and `text` train and eval sets as `Rows` built only when taken (`loader.py`): a host
tokenises only the rows of its train batches (`ArrayLoader`) and of its eval share
(`EvalLoader`). `text` is one document, tokenised in pieces cut at fixed line starts
(`text.text_rows`): a host tokenises its share of the pieces to count their tokens, and a row's
pieces when taken. `sentences` and `images` (small, generated) are built whole; each host still
scores only its share of their eval rows.

The losses live in `lora_jax.train.steps` (`objective_for`); this module is numpy only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lora_jax.data import images, sentences
from lora_jax.data.tasks import TASKS, task_rows
from lora_jax.data.text import jsonl_rows, text_rows
from lora_jax.data.tokenizers import get_tokenizer

OBJECTIVES = ("lm", "classify")


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one `DataConfig.kind` is read; every callable takes the data config `dc`."""

    inputs: tuple[str, ...]  # batch keys passed to the model, positionally, in this order
    objective: str  # 'lm' | 'classify'
    check: Callable[[Any], None]  # dc -> None; a bad field is a ValueError that names it
    tokenizer: Callable[[Any], Any]  # dc -> tokenizer (with a vocab) or None
    example: Callable[[Any], np.ndarray]  # dc -> zeros shaped (1, ...) like one model input
    load: Callable[..., tuple]  # (dc, tokenizer, process_index, process_count, allgather) ->
    #   (train rows, eval rows, task names); rows: `Rows` (built only when taken) or arrays
    files: Callable[[Any], list[str]] = lambda dc: []  # local files read (digests in run.json)
    pretrain_kind: str = ""  # the built-in kind a cached base is pretrained on ('' = itself)
    tokens: bool = True  # a row is `seq_len` tokens (throughput is also counted in tokens)


def _check_tasks(dc, known) -> None:
    unknown = [t for t in dc.tasks if t not in known]
    if unknown or not dc.tasks:
        raise ValueError(f"unknown data.tasks {unknown or '(none given)'} for data.kind="
                         f"{dc.kind!r}; known: {sorted(known)}")


def _tokens_example(dc) -> np.ndarray:
    return np.zeros((1, dc.seq_len), np.int32)


# ----------------------------------------------------------------------------- language modelling


def _load_tasks(dc, tokenizer, process_index=0, process_count=1, allgather=None):
    rows = lambda split, n: task_rows(dc.tasks, split, n, dc.seed, dc.seq_len, tokenizer)
    return rows("train", dc.n_train_per_task), rows("eval", dc.n_eval_per_task), tuple(dc.tasks)


def _check_files(dc) -> None:
    if not dc.train_path or not dc.eval_path:
        raise ValueError(f"data.kind={dc.kind!r} needs data.train_path and data.eval_path")
    for p in (dc.train_path, dc.eval_path):
        if not Path(p).is_file():
            raise ValueError(f"data file {p!r} does not exist; check data.train_path/eval_path")


def _load_jsonl(dc, tokenizer, process_index=0, process_count=1, allgather=None):
    read = lambda path, pack: jsonl_rows(path, tokenizer, dc.seq_len, pack=pack,
                                         process_index=process_index,
                                         process_count=process_count, allgather=allgather)
    return read(dc.train_path, True), read(dc.eval_path, False), ("all",)


def _load_text(dc, tokenizer, process_index=0, process_count=1, allgather=None):
    read = lambda path: text_rows([path], tokenizer, dc.seq_len, process_index=process_index,
                                  process_count=process_count, allgather=allgather)
    return read(dc.train_path), read(dc.eval_path), ("all",)


# ----------------------------------------------------------------------------- classification


def _sentence_tokenizer(dc):
    return sentences.load_wordpiece(dc.tokenizer)


def _check_sentences(dc) -> None:
    _check_tasks(dc, (sentences.TASK,))
    if dc.tokenizer != "template" and not Path(dc.tokenizer).is_file():
        raise ValueError(f"data.tokenizer={dc.tokenizer!r} for data.kind='sentences': use "
                         "'template' or a BERT tokenizer.json / vocab.txt path")


def _load_sentences(dc, tokenizer, process_index=0, process_count=1, allgather=None):
    def make(split, n):
        out = sentences.encode_pairs(sentences.make_pairs(n, dc.seed, split), tokenizer,
                                     dc.seq_len)
        return {**out, "task_ids": np.zeros(n, np.int32)}
    return make("train", dc.n_train_per_task), make("eval", dc.n_eval_per_task), (sentences.TASK,)


def _load_images(dc, tokenizer, process_index=0, process_count=1, allgather=None):
    make = lambda split, n: images.make_image_dataset(dc.tasks, split, limit=n, seed=dc.seed)
    return make("train", dc.n_train_per_task), make("eval", dc.n_eval_per_task), tuple(dc.tasks)


def _image_example(dc) -> np.ndarray:
    return np.zeros((1, images.IMAGE_SIZE, images.IMAGE_SIZE, 1), np.float32)


_LM = dict(objective="lm", tokenizer=lambda dc: get_tokenizer(dc.tokenizer),
           example=_tokens_example)
_PACKED = dict(_LM, inputs=("inputs", "segment_ids"), check=_check_files,
               files=lambda dc: [dc.train_path, dc.eval_path], pretrain_kind="tasks")
KINDS: dict[str, Kind] = {
    "tasks": Kind(**_LM, inputs=("inputs",), check=lambda dc: _check_tasks(dc, TASKS),
                  load=_load_tasks),
    "jsonl": Kind(**_PACKED, load=_load_jsonl),
    "text": Kind(**_PACKED, load=_load_text),
    "sentences": Kind(inputs=("tokens", "token_types", "mask"), objective="classify",
                      check=_check_sentences, tokenizer=_sentence_tokenizer,
                      example=_tokens_example, load=_load_sentences),
    "images": Kind(inputs=("images",), objective="classify",
                   check=lambda dc: _check_tasks(dc, images.task_names()),
                   tokenizer=lambda dc: None, example=_image_example, load=_load_images,
                   tokens=False),
}


def get_kind(name: str) -> Kind:
    """The `Kind` named by `DataConfig.kind`; an unknown name is an error listing the known."""
    if name not in KINDS:
        *rest, last = (repr(k) for k in KINDS)
        raise ValueError(f"unknown data.kind {name!r}; use {', '.join(rest)} or {last}")
    return KINDS[name]


def pretrain_kind(name: str) -> str:
    """The kind whose built-in tasks (`BaseConfig.pretrain_tasks`) pretrain a base for `name`:
    the LM task suite for every LM kind, the kind itself for the classification kinds."""
    return get_kind(name).pretrain_kind or name


def vocab_size(tokenizer) -> int | None:
    """The tokenizer's vocabulary size (ours or a `tokenizers` one), None without a tokenizer."""
    if tokenizer is None:
        return None
    size = getattr(tokenizer, "vocab_size", None)
    return int(size) if size is not None else int(tokenizer.get_vocab_size())
