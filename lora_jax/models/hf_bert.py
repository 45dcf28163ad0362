"""Hugging Face BERT checkpoints (`BertModel`, sentence-transformers folders) into `models.bert`.

`load_bert_checkpoint(dir)` reads `config.json` and `model.safetensors` with `safetensors.numpy`
(no torch), builds a `BertConfig` and maps every tensor onto our tree: torch `nn.Linear` weights
are (out, in) and are transposed, and the q/k/v/o projections are reshaped into our (`embed`,
`heads`, `kv`) kernels. Tensor names may carry a `bert.` prefix (`BertFor*` checkpoints). The
pooling comes from a sentence-transformers `1_Pooling/config.json` beside the weights when there
is one ('mean' for all-MiniLM-L6-v2), else 'cls'; with 'mean' the checkpoint's pooler is unused
and skipped. A head (`head='sequence'|'token'`) is freshly initialised unless the checkpoint has
a `classifier`. Missing, unexpected and mis-shaped tensors raise errors that name them
(`bert_checkpoint_map`, which `hf_sharded.load_hf_sharded` reads through as well, straight into
shards); GPT-2 and Llama loading is `hf.py`'s.
"""

from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.bert import BertConfig, bert_module
from lora_jax.models.hf import (
    KeyMap, _check_structure, _identity, _set_path, _transpose_reshape, check_keys,
    read_safetensors, stack_layers)

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


def bert_checkpoint_map(cfg: BertConfig, shapes: dict[str, tuple], path: str
                        ) -> tuple[KeyMap, dict[str, str]]:
    """``hf.checkpoint_map`` for BERT: ``(key map, {key-map name: stored name})``, checked.

    Stored names may carry a ``bert.`` prefix. With a head (``cfg.head != 'none'``) our paths
    sit under ``bert`` and a checkpoint's ``classifier`` maps onto ours (transposed); without
    one, a checkpoint's classifier is skipped. A head the checkpoint lacks is not in the map
    (``fresh_head`` makes it).
    """
    key_map = bert_key_map(cfg)
    head = {k: tuple(v) for k, v in shapes.items() if k.startswith("classifier.")}
    if cfg.head != "none":
        key_map = {k: (("bert", *ours), shape, convert)
                   for k, (ours, shape, convert) in key_map.items()}
    if cfg.head != "none" and head:
        n, d = cfg.n_labels, cfg.d_model
        if head != {"classifier.weight": (n, d), "classifier.bias": (n,)}:
            raise ValueError(f"Checkpoint {path!r}: classifier tensors {head} do not fit "
                             f"n_labels={n}, d_model={d}; pass the matching n_labels.")
        key_map["classifier.weight"] = (("classifier", "kernel"), (n, d), np.transpose)
        key_map["classifier.bias"] = (("classifier", "bias"), (n,), _identity)
    stored = {k.removeprefix("bert."): k for k in shapes if cfg.head != "none" or k not in head}
    check_keys({k: shapes[v] for k, v in stored.items()}, key_map, _IGNORED, path)
    return key_map, stored


def bert_hf_module(path: str, *, pooling: str | None = None, **config) -> nn.Module:
    """`Bert` (or its head module) for a Hugging Face BERT directory, from its `config.json` (and
    a sentence-transformers pooling config) alone: no weights read. `config`: `BertConfig` fields
    the checkpoint does not set (`head`, `n_labels`, `scan_layers`, `dtype`, ...)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No config.json in {path!r}; pass a Hugging Face model directory.")
    with open(cfg_path) as fh:
        hf_cfg = json.load(fh)
    pooling = pooling or sentence_transformers_pooling(path) or "cls"
    return bert_module(bert_config_from_hf(hf_cfg, pooling=pooling, **config))


def fresh_head(module: nn.Module, seed: int, shardings=None) -> dict:
    """The `classifier` of `module.init` with `seed`, alone (jit computes nothing else), placed
    by `shardings` (a tree like it) if given."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = lambda key: nn.meta.unbox(module.init(key, tokens)["params"]["classifier"])
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def load_bert_checkpoint(path: str, *, seed: int = 0, **config) -> tuple[nn.Module, dict]:
    """Loads a Hugging Face BERT directory into `Bert` (or a head module) and its params.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      seed: PRNG seed of a head the checkpoint lacks.
      config: `bert_hf_module`'s: `pooling` ('cls' or 'mean'; default: the folder's
        sentence-transformers pooling, else 'cls'); `head` ('none' returns `Bert`; 'sequence' or
        'token' a head module, params under 'bert' + 'classifier') and its `n_labels`;
        `scan_layers` (layer params stacked on axis 0 under `layers`); `remat`; `dtype` and
        `param_dtype` (compute dtype of the module; dtype of the returned params); other
        `BertConfig` fields the checkpoint does not set (`dropout_rate`, ...).
    Returns:
      (module, params): params are plain jax arrays shaped as `module.init(...)['params']`.
    """
    module = bert_hf_module(path, **config)
    cfg = module.cfg
    tensors = read_safetensors(path)
    key_map, stored = bert_checkpoint_map(cfg, {k: v.shape for k, v in tensors.items()}, path)
    params: dict = {}
    for k, (ours, _, convert) in key_map.items():
        _set_path(params, ours, convert(np.asarray(tensors[stored[k]])))
    if cfg.scan_layers and cfg.head == "none":
        params = stack_layers(params, "layers")
    elif cfg.scan_layers:
        params["bert"] = stack_layers(params["bert"], "layers")
    if cfg.head != "none" and "classifier" not in params:
        params["classifier"] = fresh_head(module, seed)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=cfg.param_dtype), params)
    _check_structure(module, params)
    return module, params
