"""Hugging Face checkpoint loading for the GPT-2 and Llama modules, and scan-layout helpers.

`load_hf_checkpoint(dir)` reads `config.json` plus `model.safetensors` (or a sharded
`model.safetensors.index.json`) with `safetensors.numpy` (no torch), builds our config, and maps
every HF tensor onto our parameter tree: GPT-2 `Conv1D` weights are already (in, out); Llama
`nn.Linear` weights are (out, in) and are transposed, and attention projections are reshaped into
our multi-axis (`embed`, `heads`, `kv`) kernels. A BERT directory (`model_type: bert`) goes to
`hf_bert.py`'s loader. Missing, unexpected and mis-shaped tensors raise errors that name them.
`stack_layers` / `unstack_layers` convert between the unscanned (`h_0..h_{L-1}`) and scanned
(`h`, stacked on axis 0) layouts. The export direction
(`config_to_hf`, `params_to_hf`) inverts the same key maps; writing files and adapter (PEFT)
files live in `lora_jax.interop`, not here.
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

from lora_jax.models.bert import BertConfig
from lora_jax.models.gpt2 import GPT2, GPT2Config
from lora_jax.models.llama import Llama, LlamaConfig

# HF tensors that are buffers, not parameters; silently skipped.
_IGNORED = {
    "gpt2": re.compile(r"(h\.\d+\.attn\.(masked_)?bias)$"),
    "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
}
STACK_PREFIX = {"gpt2": "h", "llama": "layers", "bert": "layers"}  # stacked layers' name


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


_ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel",), "llama": ("LlamaForCausalLM",)}


def config_from_hf(hf: dict, **overrides) -> GPT2Config | LlamaConfig | BertConfig:
    """Builds our config from a parsed HF `config.json` dict (model_type 'gpt2', 'llama' or
    'bert'; BERT's is `hf_bert.bert_config_from_hf`).

    Reads configs as transformers 4 and 5 write them (RoPE settings at the top level or in
    `rope_parameters`). Anything our modules would silently compute differently is refused by
    name: an unknown `model_type` or `architectures` entry, other RoPE types, biases Llama lacks.
    `overrides` set our own fields (`scan_layers`, `remat`, `dtype`, `param_dtype`, ...).
    """
    model_type = hf.get("model_type")
    if model_type == "bert":
        from lora_jax.models.hf_bert import bert_config_from_hf

        return bert_config_from_hf(hf, **overrides)
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"config.json: unknown model_type {model_type!r}; supported: "
                         f"{', '.join(repr(k) for k in (*_ARCHITECTURES, 'bert'))}.")
    unknown = [a for a in hf.get("architectures") or () if a not in _ARCHITECTURES[model_type]]
    if unknown:
        raise ValueError(f"config.json: architectures {unknown} are not supported for model_type "
                         f"{model_type!r}; supported: {list(_ARCHITECTURES[model_type])} (a "
                         "causal LM head; other heads would load wrong or not at all).")
    if model_type == "gpt2":
        return _gpt2_config(hf, overrides)
    return _llama_config(hf, overrides)


def _gpt2_config(hf: dict, overrides: dict) -> GPT2Config:
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise ValueError(f"config.json: n_inner={n_inner} is unsupported; GPT2 uses 4*n_embd.")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation_function={act!r} is unsupported; "
                         "GPT2 uses the tanh GELU ('gelu_new').")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("tie_word_embeddings", True)):
        if hf.get(key, want) != want:
            raise ValueError(f"config.json: {key}={hf[key]!r} is unsupported; GPT2 here has "
                             f"{key}={want}.")
    return GPT2Config(
        vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", hf.get("n_ctx")),
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"], n_head=hf["n_head"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), **overrides)


def rope_from_hf(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, llama3 scaling or None) from an HF Llama config, transformers 4 or 5.

    transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; transformers 4 writes
    `rope_theta` at the top level and `rope_scaling: {rope_type (or type), ...}` or null.
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"config.json: per-layer-type RoPE parameters {rope} are unsupported.")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial} is unsupported; "
                         "Llama here rotates the whole head.")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
        if missing:
            raise ValueError(f"config.json: llama3 RoPE parameters {rope} lack {missing}.")
        original = rope.get("original_max_position_embeddings",
                            hf.get("original_max_position_embeddings",
                                   hf["max_position_embeddings"]))
        return theta, (float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]), int(original))
    raise ValueError(f"config.json: rope_scaling / rope_parameters rope_type {rope_type!r} is "
                     "unsupported; supported: 'default' (plain RoPE) and 'llama3' (Llama 3.1).")


def _llama_config(hf: dict, overrides: dict) -> LlamaConfig:
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        raise ValueError(f"config.json: head_dim={head_dim} != hidden_size // "
                         "num_attention_heads is unsupported.")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key}=true is unsupported; Llama here has no biases.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r} is unsupported; Llama uses 'silu'.")
    theta, llama3 = rope_from_hf(hf)
    return LlamaConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_llama3=llama3,
        tie_embeddings=hf.get("tie_word_embeddings", False), **overrides)


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


def checkpoint_map(module: nn.Module, shapes: dict[str, tuple], path: str
                   ) -> tuple[KeyMap, dict[str, str]]:
    """``(key map, {key-map name: stored name})`` of ``module`` over a checkpoint whose tensors
    have ``shapes`` (keyed by stored name), after checking that the checkpoint has every tensor
    the key map needs, in its shape, and nothing unexpected. The whole loaders (here,
    ``hf_bert.py``) and the sharded one (``hf_sharded.py``) read through it.

    GPT-2 names may carry a ``transformer.`` prefix and its LM head (tied to ``wte``) is
    skipped, as is a tied Llama's; BERT's map is ``hf_bert.bert_checkpoint_map``.
    """
    cfg = module.cfg
    if isinstance(cfg, BertConfig):
        from lora_jax.models.hf_bert import bert_checkpoint_map

        return bert_checkpoint_map(cfg, shapes, path)
    if isinstance(cfg, GPT2Config):
        family, key_map = "gpt2", gpt2_key_map(cfg)
        stored = {k.removeprefix("transformer."): k for k in shapes if k != "lm_head.weight"}
    else:
        family, key_map = "llama", llama_key_map(cfg)
        stored = {k: k for k in shapes if not (cfg.tie_embeddings and k == "lm_head.weight")}
    check_keys({k: shapes[v] for k, v in stored.items()}, key_map, _IGNORED[family], path)
    return key_map, stored


def check_keys(shapes: dict[str, tuple], key_map: KeyMap, ignored: re.Pattern, path: str):
    """Raises ``ValueError`` naming the missing, unexpected (not ``ignored``) and mis-shaped
    tensors of a checkpoint (``shapes``: key-map name -> stored shape)."""
    unexpected = sorted(k for k in shapes if k not in key_map and not ignored.match(k))
    missing = sorted(k for k in key_map if k not in shapes)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path!r} does not match its config.json: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} total), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} total). "
            "Check model_type, num_hidden_layers/n_layer and tie_word_embeddings."
        )
    for k, (_, shape, _) in key_map.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(f"Checkpoint {path!r}: tensor {k!r} has shape "
                             f"{tuple(shapes[k])}, but config.json implies {shape}.")


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
    overrides: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Loads a Hugging Face GPT-2, Llama or BERT checkpoint directory into our module and params.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      scan_layers: if True, layer params are stacked on axis 0 under `h` / `layers`.
      remat: sets `cfg.remat` on the returned module.
      dtype: compute dtype of the module; param_dtype: dtype of the returned params.
      overrides: our config fields (the trainer's `model.overrides`). A BERT checkpoint is an
        encoder whose head they choose (`head`, `n_labels`, `pooling`, `seed`; and fields the
        checkpoint does not set, e.g. `dropout_rate`): `hf_bert.load_bert_checkpoint`'s arguments.
        GPT-2 and Llama checkpoints set every field themselves and ignore them.
    Returns:
      (module, params): params are plain (unboxed) jax arrays with exactly the structure and
      shapes of `nn.meta.unbox(module.init(...)['params'])`.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No config.json in {path!r}; pass a Hugging Face model directory.")
    with open(cfg_path) as fh:
        hf_cfg = json.load(fh)
    if hf_cfg.get("model_type") == "bert":  # an encoder: its own loader (models/hf_bert.py)
        from lora_jax.models.hf_bert import load_bert_checkpoint

        return load_bert_checkpoint(path, scan_layers=scan_layers, remat=remat, dtype=dtype,
                                    param_dtype=param_dtype, **(overrides or {}))
    cfg = config_from_hf(hf_cfg, scan_layers=scan_layers, remat=remat, dtype=dtype,
                         param_dtype=param_dtype)
    family = hf_cfg["model_type"]
    module = GPT2(cfg) if family == "gpt2" else Llama(cfg)
    tensors = read_safetensors(path)
    key_map, stored = checkpoint_map(module, {k: v.shape for k, v in tensors.items()}, path)
    params: dict = {}
    for k, (our_path, _, convert) in key_map.items():
        _set_path(params, our_path, convert(np.asarray(tensors[stored[k]])))
    if scan_layers:
        params = stack_layers(params, STACK_PREFIX[family])
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


# ----------------------------------------------------------------------------- export


def config_to_hf(cfg: GPT2Config | LlamaConfig, *, dtype: str = "float32") -> dict:
    """Our config -> an HF `config.json` dict that transformers 4 and 5 both read.

    RoPE is written the transformers-4 way (top-level `rope_theta`, `rope_scaling`), which
    transformers 5 still reads; `config_from_hf(config_to_hf(cfg))` rebuilds `cfg`.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: use 'float32' or 'bfloat16'.")
    if isinstance(cfg, GPT2Config):
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
            "tie_word_embeddings": True, "torch_dtype": dtype, "dtype": dtype,
        }
    rope_scaling = None
    if cfg.rope_llama3 is not None:
        factor, low, high, original = cfg.rope_llama3
        rope_scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype, "dtype": dtype,
    }


def _to_hf_layout(x: np.ndarray, convert: Callable, hf_shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of a key-map converter: our array -> the HF tensor of shape `hf_shape`."""
    transposed = convert is np.transpose or getattr(convert, "__qualname__", "").startswith(
        "_transpose_reshape")
    if transposed:
        return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T)
    return np.ascontiguousarray(x.reshape(hf_shape))


def params_to_hf(cfg: GPT2Config | LlamaConfig, params: dict, *,
                 dtype: str = "float32") -> dict[str, np.ndarray]:
    """Our params (scanned or not) -> HF tensors named as `save_pretrained` names them.

    The inverse of `load_hf_checkpoint`'s mapping; a tied LM head is not written (HF re-ties it).
    """
    import ml_dtypes

    family = "gpt2" if isinstance(cfg, GPT2Config) else "llama"
    prefix = STACK_PREFIX[family]
    if prefix in params:
        params = unstack_layers(params, prefix)
    key_map = gpt2_key_map(cfg) if family == "gpt2" else llama_key_map(cfg)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    out = {}
    for name, (path, shape, convert) in key_map.items():
        leaf = params
        for p in path:
            if p not in leaf:
                raise ValueError(f"params lack {'/'.join(path)} (needed for HF {name!r}).")
            leaf = leaf[p]
        x = np.asarray(leaf, np.float32)
        hf_name = ("transformer." + name) if family == "gpt2" else name
        out[hf_name] = _to_hf_layout(x, convert, shape).astype(np_dtype)
    return out
