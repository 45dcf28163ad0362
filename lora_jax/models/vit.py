"""Vision Transformer (ViT) as a Flax linen module, its presets, and Hugging Face ViT loading.

Images (batch, height, width, channels) are cut into patches by an `nn.Conv` (`patch_embed`), a
learned class token (`cls_token`) is prepended and learned position embeddings (`pos_embed`)
added; pre-LayerNorm blocks (`blocks_{i}` or a scanned `blocks`: `ln_1`, `self_attn/{q,k,v,o}_proj`
as multi-axis `nn.DenseGeneral`, `ln_2`, `mlp/{up,down}_proj`) follow, then `ln_f` and a
classification head (`head`) on the class token. The module names are chosen so the target
presets `qv`, `attn` and `all-linear` of `lora_jax.rules` select the same layers as on Llama,
and every parameter carries logical axis names. `load_hf_vit` reads a Hugging Face `ViTModel` /
`ViTForImageClassification` directory (`config.json` + `model.safetensors`, no torch).
Image data lives in `lora_jax.data.images`; adapters and training live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.gpt2 import build_layer_stack
from lora_jax.models.hf import read_safetensors, stack_layers

Dtype = Any
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a ViT; `n_patches = (image_size // patch_size) ** 2`.

    `num_classes=0` drops the head: the model then returns the final class-token features.
    """

    image_size: int = 8
    patch_size: int = 4
    channels: int = 1
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 64
    num_classes: int = 10
    qkv_bias: bool = True
    gelu_approximate: bool = False  # HF ViT's 'gelu' is the exact (erf) GELU
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"ViTConfig: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}; pick n_heads that divides d_model.")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}; pick a patch size that divides it.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_PRESETS = {
    "tiny": dict(image_size=8, patch_size=4, channels=1, d_model=32, n_layers=2, n_heads=4,
                 d_ff=64, num_classes=10),
    "digits": dict(image_size=8, patch_size=2, channels=1, d_model=64, n_layers=4, n_heads=4,
                   d_ff=128, num_classes=10),
    "vit-b/16": dict(image_size=224, patch_size=16, channels=3, d_model=768, n_layers=12,
                     n_heads=12, d_ff=3072, num_classes=1000, layer_norm_eps=1e-12),
}


def vit_config(preset: str = "tiny", **overrides) -> ViTConfig:
    """Returns the named ViT preset ('tiny', 'digits', 'vit-b/16') with overrides.

    Example: `vit_config('vit-b/16', num_classes=10, scan_layers=True)`.
    """
    if preset not in _PRESETS:
        raise ValueError(f"Unknown ViT preset {preset!r}; valid presets: {sorted(_PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"Unknown ViTConfig field(s) {bad}; valid fields: {sorted(fields)}.")
    return ViTConfig(**{**_PRESETS[preset], **overrides})


def _init(*names, std: float = _INIT_STD):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(*names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros("embed"), name=name)


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention: (batch, seq, d_model) -> same shape."""

    cfg: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def proj(name):
            return nn.DenseGeneral(
                features=(cfg.n_heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, kernel_init=_init("embed", "heads", "kv"),
                bias_init=_zeros("heads", "kv"), name=name,
            )(x)  # (batch, seq, heads, head_dim)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        use_dropout = not self.deterministic and cfg.dropout_rate > 0.0
        out = nn.dot_product_attention(
            q, k, v,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dropout_rate=cfg.dropout_rate, deterministic=not use_dropout, dtype=cfg.dtype,
            force_fp32_for_softmax=True,
        )  # (batch, seq, heads, head_dim)
        return nn.DenseGeneral(
            features=cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_init("heads", "kv", "embed"), bias_init=_zeros("embed"), name="o_proj",
        )(out)


class ViTMLP(nn.Module):
    """Position-wise MLP d_model -> d_ff -> d_model with GELU."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def dense(features, names, name):
            return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernel_init=_init(*names), bias_init=_zeros(names[1]), name=name)

        h = nn.gelu(dense(cfg.d_ff, ("embed", "mlp"), "up_proj")(x),
                    approximate=cfg.gelu_approximate)
        return dense(cfg.d_model, ("mlp", "embed"), "down_proj")(h)


class ViTBlock(nn.Module):
    """Pre-LN encoder block. Returns `(x, None)` so the same block works under `nn.scan`."""

    cfg: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        x = x + drop(ViTAttention(cfg, self.deterministic, name="self_attn")(
            _layer_norm(cfg, "ln_1")(x)))
        x = x + drop(ViTMLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x)))
        return x, cache


class ViT(nn.Module):
    """ViT classifier: float images (batch, H, W, C) -> float32 logits (batch, num_classes).

    With `cfg.num_classes == 0` it returns the final-LayerNorm class-token features
    (batch, d_model) instead (HF `last_hidden_state[:, 0]`).
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images, *, deterministic: bool = True):
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"ViT: images have shape {images.shape}, expected (batch, *{want}) "
                             "channels-last; resize the images or change image_size/channels.")
        p = cfg.patch_size
        x = nn.Conv(cfg.d_model, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, kernel_init=_init(None, None, None, "embed"),
                    bias_init=_zeros("embed"), name="patch_embed")(images.astype(cfg.dtype))
        x = x.reshape(x.shape[0], -1, cfg.d_model)  # (batch, n_patches, d_model), row-major
        cls = self.param("cls_token", _zeros(None, None, "embed"), (1, 1, cfg.d_model),
                         cfg.param_dtype)
        pos = self.param("pos_embed", _init(None, None, "embed"),
                         (1, cfg.n_patches + 1, cfg.d_model), cfg.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.d_model)).astype(x.dtype),
                             x], axis=1) + pos.astype(x.dtype)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x, _ = build_layer_stack(ViTBlock, cfg, deterministic=deterministic, prefix="blocks")(x)
        features = _layer_norm(cfg, "ln_f")(x)[:, 0]
        if cfg.num_classes == 0:
            return features.astype(jnp.float32)
        head = nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        kernel_init=_zeros("embed", None), bias_init=_zeros(None), name="head")
        return head(features).astype(jnp.float32)


# ----------------------------------------------------------------------------- HF loading

# HF tensors that are not used by our module; silently skipped. ViTModel's pooler (dense + tanh
# on the class token) is not part of ViTForImageClassification, and not of ours.
_IGNORED = re.compile(r"pooler\.dense\.(weight|bias)$")

KeyMap = dict[str, tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]


def vit_config_from_hf(hf: dict, num_classes: int, **overrides) -> ViTConfig:
    """Builds our config from a parsed HF ViT `config.json` (`model_type` 'vit').

    `num_classes` is the classifier's output size (0 for a `ViTModel` without one).
    """
    if hf.get("model_type") != "vit":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'vit'.")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: hidden_act={act!r} is unsupported; ViT loads 'gelu' "
                         "(exact) or 'gelu_new' / 'gelu_pytorch_tanh' (tanh).")
    return ViTConfig(
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
        channels=hf.get("num_channels", 3), d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], num_classes=num_classes,
        qkv_bias=hf.get("qkv_bias", True), gelu_approximate=act != "gelu",
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), **overrides)


def vit_key_map(cfg: ViTConfig) -> KeyMap:
    """HF ViT names (without the 'vit.' prefix) -> our unscanned paths, HF shapes, converters.

    torch `nn.Linear` weights are (out, in) and are transposed; attention projections are
    reshaped to our (embed, heads, head_dim) / (heads, head_dim, embed) kernels; the patch
    Conv2d weight (out, in, kh, kw) becomes Flax's (kh, kw, in, out).
    """
    d, h, hd, f, p, c = (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.patch_size,
                         cfg.channels)
    keep = lambda x: x
    m: KeyMap = {
        "embeddings.cls_token": (("cls_token",), (1, 1, d), keep),
        "embeddings.position_embeddings": (("pos_embed",), (1, cfg.n_patches + 1, d), keep),
        "embeddings.patch_embeddings.projection.weight": (
            ("patch_embed", "kernel"), (d, c, p, p), lambda x: x.transpose(2, 3, 1, 0)),
        "embeddings.patch_embeddings.projection.bias": (("patch_embed", "bias"), (d,), keep),
        "layernorm.weight": (("ln_f", "scale"), (d,), keep),
        "layernorm.bias": (("ln_f", "bias"), (d,), keep),
    }
    if cfg.num_classes:
        m["classifier.weight"] = (("head", "kernel"), (cfg.num_classes, d), np.transpose)
        m["classifier.bias"] = (("head", "bias"), (cfg.num_classes,), keep)
    for i in range(cfg.n_layers):
        hf, o = f"encoder.layer.{i}.", f"blocks_{i}"
        for ours, theirs in (("ln_1", "layernorm_before"), ("ln_2", "layernorm_after")):
            m[f"{hf}{theirs}.weight"] = ((o, ours, "scale"), (d,), keep)
            m[f"{hf}{theirs}.bias"] = ((o, ours, "bias"), (d,), keep)
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            name = f"{hf}attention.attention.{theirs}"
            m[name + ".weight"] = ((o, "self_attn", ours, "kernel"), (d, d),
                                   lambda x: x.T.reshape(d, h, hd))
            if cfg.qkv_bias:
                m[name + ".bias"] = ((o, "self_attn", ours, "bias"), (d,),
                                     lambda x: x.reshape(h, hd))
        m.update({
            hf + "attention.output.dense.weight": ((o, "self_attn", "o_proj", "kernel"), (d, d),
                                                   lambda x: x.T.reshape(h, hd, d)),
            hf + "attention.output.dense.bias": ((o, "self_attn", "o_proj", "bias"), (d,), keep),
            hf + "intermediate.dense.weight": ((o, "mlp", "up_proj", "kernel"), (f, d),
                                               np.transpose),
            hf + "intermediate.dense.bias": ((o, "mlp", "up_proj", "bias"), (f,), keep),
            hf + "output.dense.weight": ((o, "mlp", "down_proj", "kernel"), (d, f), np.transpose),
            hf + "output.dense.bias": ((o, "mlp", "down_proj", "bias"), (d,), keep),
        })
    return m


def load_hf_vit(path: str, *, scan_layers: bool = False, remat: bool = False,
                dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                ) -> tuple[ViT, dict]:
    """Loads a Hugging Face ViT directory (`ViTModel` or `ViTForImageClassification`).

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      scan_layers: if True, block params are stacked on axis 0 under `blocks`.
      remat, dtype: set on the returned module's config; param_dtype: dtype of the params.
    Returns:
      (module, params): params are plain jax arrays with exactly the structure of
      `nn.meta.unbox(module.init(...)['params'])`. The module takes channels-last images
      (batch, H, W, C); HF's `pixel_values` are (batch, C, H, W): transpose (0, 2, 3, 1).
      A checkpoint with a `classifier` gives logits, one without gives class-token features.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"No config.json in {path!r}; pass a Hugging Face ViT directory.")
    with open(cfg_path) as fh:
        hf_cfg = json.load(fh)
    tensors = {k.removeprefix("vit."): v for k, v in read_safetensors(path).items()}
    head = tensors.get("classifier.weight")
    num_classes = 0 if head is None else int(head.shape[0])
    cfg = vit_config_from_hf(hf_cfg, num_classes, scan_layers=scan_layers, remat=remat,
                             dtype=dtype)
    key_map = vit_key_map(cfg)
    unexpected = sorted(k for k in tensors if k not in key_map and not _IGNORED.match(k))
    missing = sorted(k for k in key_map if k not in tensors)
    if missing or unexpected:
        raise ValueError(
            f"ViT checkpoint {path!r} does not match its config.json: missing {missing[:8]} "
            f"({len(missing)} total), unexpected {unexpected[:8]} ({len(unexpected)} total). "
            "Check num_hidden_layers and qkv_bias.")
    params: dict = {}
    for k, (our_path, shape, convert) in key_map.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"ViT checkpoint {path!r}: tensor {k!r} has shape "
                             f"{tuple(tensors[k].shape)}, but config.json implies {shape}.")
        node = params
        for name in our_path[:-1]:
            node = node.setdefault(name, {})
        node[our_path[-1]] = convert(np.asarray(tensors[k]))
    if scan_layers:
        params = stack_layers(params, "blocks")
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), params)
    module = ViT(cfg)
    _check_structure(module, params)
    return module, params


def _check_structure(module: ViT, params: dict):
    """Guards the key map: loaded params must match the module's own init tree exactly."""
    cfg = module.cfg
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels))
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), images))["params"]
    expected = jax.tree.map(lambda x: x.shape, nn.meta.unbox(expected))
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        raise AssertionError(f"HF ViT key map out of sync with ViT: expected {expected}, "
                             f"built {got}.")
