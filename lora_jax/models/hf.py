"""Hugging Face checkpoint loading for the GPT-2 and Llama modules, and scan-layout helpers.

`load_hf_checkpoint(dir)` reads `config.json` plus `model.safetensors` (or a sharded
`model.safetensors.index.json`) with `safetensors.numpy` (no torch), builds our config, and maps
every HF tensor onto our parameter tree: GPT-2 `Conv1D` weights are already (in, out); Llama
`nn.Linear` weights are (out, in) and are transposed, and attention projections are reshaped into
our multi-axis (`embed`, `heads`, `kv`) kernels. Missing, unexpected and mis-shaped tensors raise
errors that name them. `stack_layers` / `unstack_layers` convert between the unscanned
(`h_0..h_{L-1}`) and scanned (`h`, stacked on axis 0) layouts. Saving back to HF format and
adapter (PEFT) files live in `lora_jax.interop`, not here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from lora_jax.models.gpt2 import GPT2, GPT2Config
from lora_jax.models.llama import Llama, LlamaConfig

# HF tensors that are buffers, not parameters; silently skipped.
_IGNORED = {
    "gpt2": re.compile(r"(h\.\d+\.attn\.(masked_)?bias)$"),
    "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
}
_STACK_PREFIX = {"gpt2": "h", "llama": "layers"}


# ----------------------------------------------------------------------------- scan layout


def stack_layers(params: dict, prefix: str) -> dict:
    """Replaces `{prefix}_0..{prefix}_{L-1}` subtrees by one `prefix` subtree stacked on axis 0.

    Every leaf of shape S in the per-layer subtrees becomes a leaf of shape (L, *S).
    """
    names = _layer_names(params, prefix)
    if not names:
        raise ValueError(
            f"stack_layers: no '{prefix}_<i>' entries in params keys {sorted(params)}."
        )
    out = {k: v for k, v in params.items() if k not in names}
    out[prefix] = jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray)
                               else jnp.stack(xs), *[params[n] for n in names])
    return out


def unstack_layers(params: dict, prefix: str) -> dict:
    """Inverse of `stack_layers`: splits `params[prefix]` (leaves (L, ...)) into `{prefix}_{i}`."""
    if prefix not in params:
        raise ValueError(f"unstack_layers: no '{prefix}' entry in params keys {sorted(params)}.")
    stacked = params[prefix]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != prefix}
    for i in range(n):
        out[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def _layer_names(params: dict, prefix: str) -> list[str]:
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)$")
    idx = sorted(int(m.group(1)) for k in params if (m := pattern.match(k)))
    if idx != list(range(len(idx))):
        raise ValueError(f"'{prefix}_<i>' layers are not numbered 0..L-1: got indices {idx}.")
    return [f"{prefix}_{i}" for i in idx]


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, **overrides) -> GPT2Config | LlamaConfig:
    """Builds our config from a parsed HF `config.json` dict (model_type 'gpt2' or 'llama').

    `overrides` set our own fields (`scan_layers`, `remat`, `dtype`, `param_dtype`, ...).
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        n_inner = hf.get("n_inner")
        if n_inner is not None and n_inner != 4 * hf["n_embd"]:
            raise ValueError(f"config.json: n_inner={n_inner} is unsupported; GPT2 uses 4*n_embd.")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json: activation_function={act!r} is unsupported; "
                             "GPT2 uses the tanh GELU ('gelu_new').")
        return GPT2Config(
            vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", hf.get("n_ctx")),
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"], n_head=hf["n_head"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), **overrides)
    if model_type == "llama":
        if hf.get("rope_scaling"):
            raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']} is unsupported; "
                             "only plain RoPE (rope_scaling null) loads.")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
            raise ValueError(f"config.json: head_dim={head_dim} != hidden_size // "
                             "num_attention_heads is unsupported.")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("config.json: attention_bias / mlp_bias are unsupported.")
        return LlamaConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
            tie_embeddings=hf.get("tie_word_embeddings", False), **overrides)
    raise ValueError(f"config.json: unknown model_type {model_type!r}; supported: 'gpt2', 'llama'.")


# ----------------------------------------------------------------------------- key maps

# A key map sends an HF tensor name to (our unscanned path, expected HF shape, converter).
KeyMap = dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]


def _identity(x):
    return x


def _reshape(*shape):
    return lambda x: x.reshape(shape)


def _transpose_reshape(*shape):
    return lambda x: x.T.reshape(shape)


def gpt2_key_map(cfg: GPT2Config) -> KeyMap:
    """HF GPT-2 names (without 'transformer.') -> our paths; Conv1D weights are (in, out)."""
    d, h, hd, f = cfg.d_model, cfg.n_head, cfg.head_dim, 4 * cfg.d_model
    m = {
        "wte.weight": (("wte", "embedding"), (cfg.vocab_size, d), _identity),
        "wpe.weight": (("wpe", "embedding"), (cfg.n_positions, d), _identity),
        "ln_f.weight": (("ln_f", "scale"), (d,), _identity),
        "ln_f.bias": (("ln_f", "bias"), (d,), _identity),
    }
    for i in range(cfg.n_layers):
        p, o = f"h.{i}.", f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            m[p + ln + ".weight"] = ((o, ln, "scale"), (d,), _identity)
            m[p + ln + ".bias"] = ((o, ln, "bias"), (d,), _identity)
        m.update({
            p + "attn.c_attn.weight": ((o, "attn", "c_attn", "kernel"), (d, 3 * d),
                                       _reshape(d, 3, h, hd)),
            p + "attn.c_attn.bias": ((o, "attn", "c_attn", "bias"), (3 * d,), _reshape(3, h, hd)),
            p + "attn.c_proj.weight": ((o, "attn", "c_proj", "kernel"), (d, d), _reshape(h, hd, d)),
            p + "attn.c_proj.bias": ((o, "attn", "c_proj", "bias"), (d,), _identity),
            p + "mlp.c_fc.weight": ((o, "mlp", "c_fc", "kernel"), (d, f), _identity),
            p + "mlp.c_fc.bias": ((o, "mlp", "c_fc", "bias"), (f,), _identity),
            p + "mlp.c_proj.weight": ((o, "mlp", "c_proj", "kernel"), (f, d), _identity),
            p + "mlp.c_proj.bias": ((o, "mlp", "c_proj", "bias"), (d,), _identity),
        })
    return m


def llama_key_map(cfg: LlamaConfig) -> KeyMap:
    """HF Llama names -> our paths; torch Linear weights (out, in) are transposed and reshaped."""
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    m = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), (cfg.vocab_size, d),
                                      _identity),
        "model.norm.weight": (("norm", "scale"), (d,), _identity),
    }
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), (cfg.vocab_size, d), np.transpose)
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers_{i}"
        m.update({
            p + "input_layernorm.weight": ((o, "input_layernorm", "scale"), (d,), _identity),
            p + "post_attention_layernorm.weight": ((o, "post_attention_layernorm", "scale"),
                                                    (d,), _identity),
            p + "self_attn.q_proj.weight": ((o, "self_attn", "q_proj", "kernel"), (h * hd, d),
                                            _transpose_reshape(d, h, hd)),
            p + "self_attn.k_proj.weight": ((o, "self_attn", "k_proj", "kernel"), (kv * hd, d),
                                            _transpose_reshape(d, kv, hd)),
            p + "self_attn.v_proj.weight": ((o, "self_attn", "v_proj", "kernel"), (kv * hd, d),
                                            _transpose_reshape(d, kv, hd)),
            p + "self_attn.o_proj.weight": ((o, "self_attn", "o_proj", "kernel"), (d, h * hd),
                                            _transpose_reshape(h, hd, d)),
            p + "mlp.gate_proj.weight": ((o, "mlp", "gate_proj", "kernel"), (f, d), np.transpose),
            p + "mlp.up_proj.weight": ((o, "mlp", "up_proj", "kernel"), (f, d), np.transpose),
            p + "mlp.down_proj.weight": ((o, "mlp", "down_proj", "kernel"), (d, f), np.transpose),
        })
    return m


# ----------------------------------------------------------------------------- loading


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads `model.safetensors` or every shard of `model.safetensors.index.json` under `path`."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return dict(load_file(single))
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"No weights in {path!r}: expected 'model.safetensors' or "
            "'model.safetensors.index.json' (download the safetensors files, "
            "not pytorch_model.bin)."
        )
    with open(index) as fh:
        weight_map = json.load(fh)["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"Shard {shard!r} listed in {index!r} is missing.")
        tensors.update(load_file(shard_path))
    return tensors


def _check_keys(tensors: dict, key_map: KeyMap, ignored: re.Pattern, path: str):
    unexpected = sorted(k for k in tensors if k not in key_map and not ignored.match(k))
    missing = sorted(k for k in key_map if k not in tensors)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path!r} does not match its config.json: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} total), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} total). "
            "Check model_type, num_hidden_layers/n_layer and tie_word_embeddings."
        )
    for k, (_, shape, _) in key_map.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"Checkpoint {path!r}: tensor {k!r} has shape "
                             f"{tuple(tensors[k].shape)}, but config.json implies {shape}.")


def _set_path(tree: dict, path: tuple[str, ...], value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_hf_checkpoint(
    path: str,
    *,
    scan_layers: bool = False,
    remat: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[nn.Module, dict]:
    """Loads a Hugging Face GPT-2 or Llama checkpoint directory into our module and params.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      scan_layers: if True, layer params are stacked on axis 0 under `h` / `layers`.
      remat: sets `cfg.remat` on the returned module.
      dtype: compute dtype of the module; param_dtype: dtype of the returned params.
    Returns:
      (module, params): params are plain (unboxed) jax arrays with exactly the structure and
      shapes of `nn.meta.unbox(module.init(...)['params'])`.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No config.json in {path!r}; pass a Hugging Face model directory.")
    with open(cfg_path) as fh:
        hf_cfg = json.load(fh)
    cfg = config_from_hf(hf_cfg, scan_layers=scan_layers, remat=remat, dtype=dtype,
                         param_dtype=param_dtype)
    family = hf_cfg["model_type"]
    module = GPT2(cfg) if family == "gpt2" else Llama(cfg)
    key_map = gpt2_key_map(cfg) if family == "gpt2" else llama_key_map(cfg)

    tensors = read_safetensors(path)
    if family == "gpt2":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()
                   if k != "lm_head.weight"}  # the LM head is tied to wte
    elif cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    _check_keys(tensors, key_map, _IGNORED[family], path)

    params: dict = {}
    for k, (our_path, _, convert) in key_map.items():
        _set_path(params, our_path, convert(np.asarray(tensors[k])))
    if scan_layers:
        params = stack_layers(params, _STACK_PREFIX[family])
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
    _check_structure(module, params)
    return module, params


def _check_structure(module: nn.Module, params: dict):
    """Guards the key maps: loaded params must match the module's own init tree exactly."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens))["params"]
    expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(expected))
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        raise AssertionError(f"HF key map out of sync with {type(module).__name__}: "
                             f"expected {expected}, built {got}.")
