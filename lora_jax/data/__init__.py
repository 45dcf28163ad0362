"""Data for lora_jax: tokenizers, synthetic tasks, local text/JSONL datasets, a batch loader.

Every dataset comes out as the same dict of numpy arrays, the contract with the trainer:
`inputs` int32 (N, T), `targets` int32 (N, T) (next tokens), `loss_mask` float32 (N, T),
`task_ids` int32 (N,). Pure numpy: nothing here imports JAX, and importing has no side effects.
"""

from lora_jax.data.loader import ArrayLoader
from lora_jax.data.tasks import (
    TASKS,
    TaskFamily,
    exact_match,
    make_task_dataset,
    per_task_accuracy,
    task_names,
)
from lora_jax.data.text import load_jsonl, load_text, rows_to_arrays, shard_rows
from lora_jax.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ArrayLoader",
    "ByteTokenizer",
    "HFTokenizer",
    "TASKS",
    "TaskFamily",
    "Tokenizer",
    "exact_match",
    "get_tokenizer",
    "load_jsonl",
    "load_text",
    "make_task_dataset",
    "per_task_accuracy",
    "rows_to_arrays",
    "shard_rows",
    "task_names",
]
