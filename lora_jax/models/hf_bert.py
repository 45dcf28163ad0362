"""Hugging Face BERT checkpoints (`BertModel`, sentence-transformers folders) into `models.bert`.

`load_bert_checkpoint(dir)` reads `config.json` and `model.safetensors` with `safetensors.numpy`
(no torch), builds a `BertConfig` and maps every tensor onto our tree: torch `nn.Linear` weights
are (out, in) and are transposed, and the q/k/v/o projections are reshaped into our (`embed`,
`heads`, `kv`) kernels. Tensor names may carry a `bert.` prefix (`BertFor*` checkpoints). The
pooling comes from a sentence-transformers `1_Pooling/config.json` beside the weights when there
is one ('mean' for all-MiniLM-L6-v2), else 'cls'; with 'mean' the checkpoint's pooler is unused
and skipped. A head (`head='sequence'|'token'`) is freshly initialised unless the checkpoint has
a `classifier`. Missing, unexpected and mis-shaped tensors raise errors that name them; GPT-2 and
Llama loading is `hf.py`'s.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.bert import BertConfig, bert_module
from lora_jax.models.hf import (
    KeyMap, _check_keys, _identity, _set_path, _transpose_reshape, read_safetensors, stack_layers)

_IGNORED = re.compile(r"(embeddings\.position_ids|pooler\..*|cls\..*)$")


def bert_config_from_hf(hf: dict, **overrides) -> BertConfig:
    """Builds a `BertConfig` from a parsed HF `config.json` dict (model_type 'bert').

    `overrides` set our own fields (`pooling`, `head`, `n_labels`, `scan_layers`, `dtype`, ...).
    """
    if hf.get("model_type") != "bert":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'bert'.")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is unsupported; "
                         "our BERT uses the exact (erf) GELU, 'gelu'.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("config.json: only position_embedding_type 'absolute' is supported.")
    fields = dict(
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_id=hf.get("pad_token_id", 0) or 0)
    clash = sorted(set(fields) & set(overrides))
    if clash:
        raise ValueError(f"overrides {clash} are set by the checkpoint's config.json; only the "
                         "head (head, n_labels, pooling) and fields it lacks can be overridden")
    return BertConfig(**fields, **overrides)


def sentence_transformers_pooling(path: str) -> str | None:
    """'mean' or 'cls' from `path/1_Pooling/config.json`, or None if there is none."""
    cfg_path = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as fh:
        pooling = json.load(fh)
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{cfg_path}: only mean or CLS pooling is supported, got {pooling}.")


def bert_key_map(cfg: BertConfig) -> KeyMap:
    """HF BERT names (without 'bert.') -> our paths in `Bert`'s tree."""
    d, h, hd, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    ln = lambda hf, ours: {hf + ".weight": (ours + ("scale",), (d,), _identity),
                           hf + ".bias": (ours + ("bias",), (d,), _identity)}
    m = {
        "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"),
                                              (cfg.vocab_size, d), _identity),
        "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"),
                                                  (cfg.max_positions, d), _identity),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"),
                                                    (cfg.type_vocab_size, d), _identity),
        **ln("embeddings.LayerNorm", ("embed_norm",)),
    }
    if cfg.pooling == "cls":
        m["pooler.dense.weight"] = (("pooler", "kernel"), (d, d), np.transpose)
        m["pooler.dense.bias"] = (("pooler", "bias"), (d,), _identity)
    for i in range(cfg.n_layers):
        p, o = f"encoder.layer.{i}.", f"layers_{i}"
        for hf_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            m[f"{p}attention.self.{hf_name}.weight"] = (
                (o, "self_attn", ours, "kernel"), (d, d), _transpose_reshape(d, h, hd))
            m[f"{p}attention.self.{hf_name}.bias"] = (
                (o, "self_attn", ours, "bias"), (d,), lambda x: x.reshape(h, hd))
        m.update({
            p + "attention.output.dense.weight": ((o, "self_attn", "o_proj", "kernel"), (d, d),
                                                  _transpose_reshape(h, hd, d)),
            p + "attention.output.dense.bias": ((o, "self_attn", "o_proj", "bias"), (d,),
                                                _identity),
            p + "intermediate.dense.weight": ((o, "mlp", "up_proj", "kernel"), (f, d),
                                              np.transpose),
            p + "intermediate.dense.bias": ((o, "mlp", "up_proj", "bias"), (f,), _identity),
            p + "output.dense.weight": ((o, "mlp", "down_proj", "kernel"), (d, f), np.transpose),
            p + "output.dense.bias": ((o, "mlp", "down_proj", "bias"), (d,), _identity),
            **ln(p + "attention.output.LayerNorm", (o, "attn_norm")),
            **ln(p + "output.LayerNorm", (o, "mlp_norm")),
        })
    return m


def load_bert_checkpoint(
    path: str,
    *,
    pooling: str | None = None,
    head: str = "none",
    n_labels: int = 2,
    seed: int = 0,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **overrides,
) -> tuple[nn.Module, dict]:
    """Loads a Hugging Face BERT directory into `Bert` (or a head module) and its params.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      pooling: 'cls' or 'mean'; default: the folder's sentence-transformers pooling, else 'cls'.
      head: 'none' (returns `Bert`), 'sequence' or 'token' (params under 'bert' + 'classifier').
      n_labels: the head's outputs; seed: PRNG seed of a head the checkpoint lacks.
      scan_layers: stack layer params on axis 0 under `layers`.
      dtype, param_dtype: compute dtype of the module; dtype of the returned params.
      overrides: other `BertConfig` fields the checkpoint does not set (`dropout_rate`, ...).
    Returns:
      (module, params): params are plain jax arrays shaped as `module.init(...)['params']`.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No config.json in {path!r}; pass a Hugging Face model directory.")
    with open(cfg_path) as fh:
        hf_cfg = json.load(fh)
    pooling = pooling or sentence_transformers_pooling(path) or "cls"
    cfg = bert_config_from_hf(hf_cfg, pooling=pooling, head=head, n_labels=n_labels,
                              scan_layers=scan_layers, remat=remat, dtype=dtype,
                              param_dtype=param_dtype, **overrides)
    tensors = read_safetensors(path)
    classifier = {k: v for k, v in tensors.items() if k.startswith("classifier.")}
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()
               if not k.startswith("classifier.")}
    key_map = bert_key_map(cfg)
    _check_keys(tensors, key_map, _IGNORED, path)
    params: dict = {}
    for k, (ours, _, convert) in key_map.items():
        _set_path(params, ours, convert(np.asarray(tensors[k])))
    if scan_layers:
        params = stack_layers(params, "layers")
    module = bert_module(cfg)
    if head != "none":
        params = {"bert": params, "classifier": _classifier(module, classifier, seed, path)}
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
    _check_structure(module, params)
    return module, params


def _classifier(module: nn.Module, tensors: dict, seed: int, path: str) -> dict:
    """The checkpoint's `classifier` (transposed) or a fresh one from the module's own init."""
    if tensors:
        w, b = tensors.get("classifier.weight"), tensors.get("classifier.bias")
        n = module.cfg.n_labels
        if w is None or b is None or w.shape != (n, module.cfg.d_model):
            raise ValueError(f"Checkpoint {path!r}: classifier tensors "
                             f"{ {k: v.shape for k, v in tensors.items()} } do not fit "
                             f"n_labels={n}, d_model={module.cfg.d_model}; pass the matching "
                             "n_labels.")
        return {"kernel": np.asarray(w).T, "bias": np.asarray(b)}
    tokens = jnp.zeros((1, 1), jnp.int32)
    fresh = module.init(jax.random.key(seed), tokens, mask=jnp.ones((1, 1), bool))
    return nn.meta.unbox(fresh["params"]["classifier"])


def _check_structure(module: nn.Module, params: dict):
    """Guards the key map: loaded params must match the module's own init tree exactly."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))["params"]
    expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(expected))
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        raise AssertionError(f"BERT key map out of sync with {type(module).__name__}: "
                             f"expected {expected}, built {got}.")
