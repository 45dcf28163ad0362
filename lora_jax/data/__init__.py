"""Data for lora_jax: tokenizers, synthetic tasks, local text/JSONL datasets, train/eval loaders.

Every dataset comes out as named numpy arrays (a dict, or `Rows` built only when taken), the
contract with the trainer, whose keys depend on its kind (`kinds.py`, the table from
`DataConfig.kind` to its loader): for language modelling `inputs` int32 (N, T), `targets` int32
(N, T) (next tokens), `loss_mask` float32 (N, T), `task_ids` int32 (N,), and for packed rows (the
`text` and `jsonl` kinds) `segment_ids` int32 (N, T) (0 on padding, 1, 2, ... per example in the
row); for classification the model's inputs, `labels` int32 (N,) and `task_ids`.
Pure numpy: nothing here imports JAX, and importing has no side effects.
"""

from lora_jax.data.kinds import KINDS, Kind, get_kind, pretrain_kind, vocab_size
from lora_jax.data.loader import ArrayLoader, EvalLoader, Rows
from lora_jax.data.tasks import (
    TASKS,
    TaskFamily,
    exact_match,
    make_task_dataset,
    per_task_accuracy,
    task_names,
    task_rows,
)
from lora_jax.data.text import jsonl_rows, load_jsonl, load_text, rows_to_arrays, text_rows
from lora_jax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ArrayLoader",
    "ByteTokenizer",
    "EvalLoader",
    "HFTokenizer",
    "KINDS",
    "Kind",
    "TASKS",
    "TaskFamily",
    "Tokenizer",
    "exact_match",
    "get_kind",
    "get_tokenizer",
    "jsonl_rows",
    "load_jsonl",
    "load_text",
    "make_task_dataset",
    "per_task_accuracy",
    "pretrain_kind",
    "Rows",
    "rows_to_arrays",
    "task_names",
    "task_rows",
    "text_rows",
    "vocab_size",
]
