"""Llama (1/2/3-style) as a Flax linen module, laid out for LoRA interception and logical sharding.

Pre-RMSNorm decoder blocks with rotary position embeddings (Hugging Face's `rotate_half`
convention, so HF q/k weights load without permutation), grouped-query attention and a SwiGLU
MLP. Every projection is a stock `nn.Dense` / `nn.DenseGeneral` / `nn.Embed` with logical axis
names; module names (`embed_tokens`, `layers_{i}` or a scanned `layers`, `self_attn/{q,k,v,o}_proj`,
`mlp/{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`) are a
contract with the LoRA target presets and the Hugging Face loader (`lora_jax.models.hf`).
The layer-stack builder, attention mask and KV-cache helpers are shared with `gpt2.py`
(packed rows: `Llama(cfg)(tokens, segment_ids)`; decoding: `Llama(cfg)(tokens, cache=...,
cache_index=..., positions=..., kv_mask=...)` returns `(logits, cache)`; the cache holds the
rotated keys of the `n_kv_heads` heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.models.gpt2 import (packed_positions, attention_mask, build_layer_stack, causal_mask,
                                  make_cache, update_cache)

Dtype = Any
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model; `head_dim = d_model // n_heads`."""

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 344
    max_seq_len: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 RoPE scaling as (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None is plain RoPE.
    rope_llama3: tuple[float, float, float, int] | None = None
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (with remat)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model."
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_kv_heads={self.n_kv_heads} does not divide "
                f"n_heads={self.n_heads}; grouped-query attention needs n_heads % n_kv_heads == 0."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig: head_dim={self.head_dim} is odd; rotary embeddings need an even "
                "head_dim (d_model // n_heads)."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_PRESETS = {
    "tiny": dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=344,
                 max_seq_len=128),
    "llama2-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=11008, max_seq_len=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama2-70b": dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       d_ff=28672, max_seq_len=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
}


def llama_config(preset: str = "tiny", **overrides) -> LlamaConfig:
    """Returns the named Llama preset ('tiny', 'llama2-7b', 'llama2-70b') with overrides.

    Example: `llama_config('llama2-7b', scan_layers=True, remat=True)`.
    """
    if preset not in _PRESETS:
        raise ValueError(f"Unknown Llama preset {preset!r}; valid presets: {sorted(_PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"Unknown LlamaConfig field(s) {bad}; valid fields: {sorted(fields)}.")
    return LlamaConfig(**{**_PRESETS[preset], **overrides})


def _init(*names):
    return nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), names)


def _rms_norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(
        epsilon=cfg.rms_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        name=name,
    )


def init_cache(cfg: LlamaConfig, batch: int, n_slots: int):
    """A zero KV cache: `{'k', 'v'}` of shape (n_layers, batch, n_slots, n_kv_heads, head_dim)."""
    if n_slots > cfg.max_seq_len:
        raise ValueError(f"Llama: a cache of {n_slots} slots exceeds max_seq_len="
                         f"{cfg.max_seq_len}; generate fewer tokens or shorten the prompt.")
    return make_cache(cfg.n_layers, batch, n_slots, cfg.n_kv_heads, cfg.head_dim, cfg.dtype)


def rope_inv_freq(head_dim: int, theta: float, llama3: tuple | None = None):
    """Rotary inverse frequencies (head_dim/2,), float32; with `llama3`, Llama-3.1's scaling.

    `llama3 = (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)`:
    wavelengths shorter than original/high_freq_factor keep their frequency, those longer than
    original/low_freq_factor are divided by `factor`, and the band between is interpolated
    smoothly (transformers' `_compute_llama3_parameters`).
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if llama3 is None:
        return inv_freq
    factor, low, high, original = llama3
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, theta: float, positions=None, inv_freq=None):
    """Rotary embedding at `positions` (default arange(seq)), HF `rotate_half` layout.

    Args:
      x: (batch, seq, heads, head_dim) queries or keys.
      theta: rotary base (`rope_theta`).
      positions: int (batch, seq), or None for arange(seq).
      inv_freq: optional precomputed (head_dim/2,) frequencies (`rope_inv_freq`); overrides theta.
    Returns:
      Array of x's shape and dtype; pairs are (i, i + head_dim/2), not interleaved.
    """
    seq, head_dim = x.shape[1], x.shape[-1]
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)
    if positions is None:
        angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None]  # (seq, head_dim/2)
        angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    else:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, seq, head_dim/2)
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE: (batch, seq, d_model) -> same shape."""

    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        """`side` = (mask, positions, cache_index) from the model; returns (out, layer cache)."""
        cfg = self.cfg
        mask, positions, cache_index = (side if side is not None
                                        else (causal_mask(x.shape[1]), None, None))

        def proj(heads, head_names, name):
            return nn.DenseGeneral(
                features=(heads, cfg.head_dim),
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_init("embed", head_names, "kv"),
                name=name,
            )(x)  # (batch, seq, heads, head_dim)

        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_llama3)
        q = apply_rope(proj(cfg.n_heads, "heads", "q_proj"), cfg.rope_theta, positions, inv_freq)
        k = apply_rope(proj(cfg.n_kv_heads, "kv_heads", "k_proj"), cfg.rope_theta, positions,
                       inv_freq)
        v = proj(cfg.n_kv_heads, "kv_heads", "v_proj")
        if cache is not None:
            cache, k, v = update_cache(cache, k, v, cache_index)
        groups = cfg.n_heads // cfg.n_kv_heads  # kv head j serves query heads j*groups..
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        use_dropout = not self.deterministic and cfg.dropout_rate > 0.0
        out = nn.dot_product_attention(
            q, k, v,
            mask=mask,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dropout_rate=cfg.dropout_rate,
            deterministic=not use_dropout,
            dtype=cfg.dtype,
            force_fp32_for_softmax=True,
        )  # (batch, seq, heads, head_dim)
        return nn.DenseGeneral(
            features=cfg.d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_init("heads", "kv", "embed"),
            name="o_proj",
        )(out), cache


class LlamaMLP(nn.Module):
    """SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), d_model -> d_ff -> d_model."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def dense(features, names, name):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_init(*names),
                name=name,
            )

        gate = dense(cfg.d_ff, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.d_ff, ("embed", "mlp"), "up_proj")(x)
        return dense(cfg.d_model, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm decoder block. Returns `(x, new layer cache)` so it works under `nn.scan`."""

    cfg: LlamaConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h, cache = LlamaAttention(cfg, self.deterministic, name="self_attn")(
            _rms_norm(cfg, "input_layernorm")(x), cache, side)
        x = x + drop(h)
        h = LlamaMLP(cfg, name="mlp")(_rms_norm(cfg, "post_attention_layernorm")(x))
        return x + drop(h), cache


class Llama(nn.Module):
    """Llama language model: int32 tokens (batch, seq) -> float32 logits (batch, seq, vocab).

    `segment_ids` (packed rows) and the decoding arguments (`positions`, `kv_mask`, `cache`,
    `cache_index`) as in `GPT2`; with a cache it returns `(logits, cache)`.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, *, deterministic: bool = True, positions=None,
                 kv_mask=None, cache=None, cache_index=None):
        cfg = self.cfg
        seq = tokens.shape[-1]
        if cache is not None and cache_index is None:
            raise ValueError("Llama: decoding with a cache needs cache_index= (an int array)")
        positions = packed_positions("Llama", segment_ids, positions, cache)
        if seq > cfg.max_seq_len:
            raise ValueError(
                f"Llama: sequence length {seq} exceeds max_seq_len={cfg.max_seq_len}; "
                "truncate the input or raise max_seq_len in the config."
            )
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype,
                         embedding_init=_init("vocab", "embed"), name="embed_tokens")
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(embed(tokens))
        n_slots = seq if cache is None else cache["k"].shape[2]
        side = (attention_mask(seq, kv_mask, cache_index, n_slots, segment_ids), positions,
                cache_index)
        x, cache = build_layer_stack(LlamaBlock, cfg, deterministic=deterministic,
                                     prefix="layers")(x, cache, side)
        x = _rms_norm(cfg, "norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x).astype(jnp.float32)
        else:
            lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, kernel_init=_init("embed", "vocab"),
                               name="lm_head")
            logits = lm_head(x).astype(jnp.float32)
        return logits if cache is None else (logits, cache)
