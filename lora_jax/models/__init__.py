"""Flax linen models (GPT-2, Llama, BERT), their presets, and Hugging Face checkpoint loading.

`get_model(family, preset, **overrides)` is the one entry point that maps a family name and a
preset to `(module, config)`; the modules themselves live in `gpt2.py`, `llama.py` and `bert.py`,
loading of HF checkpoints and the scanned/unscanned layout helpers in `hf.py` (BERT's in
`hf_bert.py`). Adapters, training and sharding rules live elsewhere. Importing this package has
no side effects.
"""

from __future__ import annotations

import flax.linen as nn

from lora_jax.models.bert import Bert, BertConfig, bert_config, bert_module
from lora_jax.models.gpt2 import GPT2, GPT2Config, gpt2_config
from lora_jax.models.hf import (
    config_from_hf,
    load_hf_checkpoint,
    stack_layers,
    unstack_layers,
)
from lora_jax.models.hf_bert import load_bert_checkpoint
from lora_jax.models.llama import Llama, LlamaConfig, llama_config
from lora_jax.models.vit import ViT, ViTConfig, load_hf_vit, vit_config

_FAMILIES = {
    "bert": (bert_module, bert_config),
    "gpt2": (GPT2, gpt2_config),
    "llama": (Llama, llama_config),
    "vit": (ViT, vit_config),
}


def get_model(family: str, preset: str = "tiny", **overrides) -> tuple[nn.Module, object]:
    """Returns `(module, config)` for a model family ('bert', 'gpt2', 'llama') and preset.

    Example: `model, cfg = get_model('llama', 'tiny', scan_layers=True)`; then
    `model.init(rng, tokens)` with int32 tokens (batch, seq) gives logits (batch, seq, vocab).
    """
    if family not in _FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; valid families: {sorted(_FAMILIES)}.")
    module_cls, make_config = _FAMILIES[family]
    cfg = make_config(preset, **overrides)
    return module_cls(cfg), cfg


__all__ = [
    "Bert",
    "BertConfig",
    "bert_config",
    "load_bert_checkpoint",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "config_from_hf",
    "get_model",
    "gpt2_config",
    "llama_config",
    "load_hf_checkpoint",
    "stack_layers",
    "unstack_layers",
    "ViT",
    "ViTConfig",
    "load_hf_vit",
    "vit_config",
]
