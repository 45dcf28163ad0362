"""GPT-2 as a Flax linen module, laid out for LoRA interception and logical sharding.

Every projection is a stock `nn.Dense` / `nn.DenseGeneral` / `nn.Embed` (so `nn.intercept_methods`
can add adapters read from a `'lora'` collection that mirrors `'params'`), and every kernel,
embedding and norm parameter carries logical axis names. The module and parameter names are a
contract with the LoRA target presets and the Hugging Face loader (`lora_jax.models.hf`):
`wte`, `wpe`, `h_{i}` (or a scanned `h`) / `ln_1`, `attn/c_attn`, `attn/c_proj`, `ln_2`,
`mlp/c_fc`, `mlp/c_proj`, and `ln_f`; the LM head is tied to `wte`. Checkpoint loading,
adapters and training live elsewhere.

Packed rows: `segment_ids` (batch, seq) (0 = padding, 1.. = the example in the row), the optional
second argument, make attention block-diagonal causal and restart positions at each segment
(`segment_positions`), so each example is computed as if it were alone in its row.

Decoding: called with `cache=` (from `init_cache`), the model writes the new keys and values at
slot `cache_index` of a fixed-size per-layer KV cache and returns `(logits, cache)`; `positions`
(batch, seq) and `kv_mask` (batch, slots) let left-padded batches keep their own positions and
hide their pad slots. The mask helpers `attention_mask` and `segment_positions` and the cache
plumbing of the layer stack are shared with `llama.py`. The generation loop itself lives in
`lora_jax.generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 model; `head_dim = d_model // n_head`, MLP width `4 * d_model`."""

    vocab_size: int = 512
    n_positions: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_head: int = 4
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (with remat)

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPT2Config: d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head that divides d_model."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


_PRESETS = {
    "tiny": dict(vocab_size=512, n_positions=128, d_model=128, n_layers=4, n_head=4),
    "small": dict(vocab_size=50257, n_positions=1024, d_model=768, n_layers=12, n_head=12),
    "medium": dict(vocab_size=50257, n_positions=1024, d_model=1024, n_layers=24, n_head=16),
    "large": dict(vocab_size=50257, n_positions=1024, d_model=1280, n_layers=36, n_head=20),
    "xl": dict(vocab_size=50257, n_positions=1024, d_model=1600, n_layers=48, n_head=25),
}


def gpt2_config(preset: str = "tiny", **overrides) -> GPT2Config:
    """Returns the named GPT-2 preset ('tiny', 'small', 'medium', 'large', 'xl') with overrides.

    Example: `gpt2_config('small', scan_layers=True, dtype=jnp.bfloat16)`.
    """
    if preset not in _PRESETS:
        raise ValueError(f"Unknown GPT-2 preset {preset!r}; valid presets: {sorted(_PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"Unknown GPT2Config field(s) {bad}; valid fields: {sorted(fields)}.")
    return GPT2Config(**{**_PRESETS[preset], **overrides})


def _dense_init(*names):
    return nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), names)


def _zeros(*names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros("embed"),
        name=name,
    )


def causal_mask(seq_len: int):
    """Boolean mask (1, 1, seq, seq), True where query position i may attend key position j <= i."""
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None]


def attention_mask(seq_len: int, kv_mask=None, cache_index=None, n_slots: int | None = None,
                   segment_ids=None):
    """The attention mask for `seq_len` queries written at slots `cache_index + arange(seq_len)`.

    Args:
      seq_len: number of query tokens in this call.
      kv_mask: bool (batch, n_slots), False at pad slots; None: every slot is valid.
      cache_index: int scalar array, the slot of the first query (None: 0, no cache).
      n_slots: number of key slots (the cache length; default `seq_len`).
      segment_ids: int (batch, seq_len) of packed rows (no cache): a query sees only keys of its
        own segment (block-diagonal causal); None: one segment.
    Returns:
      bool (1 or batch, 1, seq_len, n_slots): query i may see key slot j <= its own slot.
    """
    if kv_mask is None and cache_index is None and segment_ids is None:
        return causal_mask(seq_len)
    n_slots = seq_len if n_slots is None else n_slots
    start = 0 if cache_index is None else cache_index
    q_slot = start + jnp.arange(seq_len)
    mask = (jnp.arange(n_slots)[None, :] <= q_slot[:, None])[None, None]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :].astype(bool)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def segment_positions(segment_ids):
    """Each token's index within its segment: int32 (batch, seq) from int (batch, seq) ids.

    Example: ids `[[1, 1, 1, 2, 2, 0]]` give `[[0, 1, 2, 0, 1, 0]]`.
    """
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def packed_positions(name: str, segment_ids, positions, cache):
    """The positions model `name` uses: `positions` if given, else per segment with
    `segment_ids` (else None: arange). Packed rows and a KV cache together are an error."""
    if segment_ids is None:
        return positions
    if cache is not None:
        raise ValueError(f"{name}: segment_ids (packed rows) are for training and scoring; "
                         "decode with a cache without them")
    return segment_positions(segment_ids) if positions is None else positions


def update_cache(layer_cache, k, v, cache_index):
    """Writes k, v (batch, seq, kv_heads, head_dim) at slot `cache_index` of one layer's cache
    `{'k', 'v'}` (batch, n_slots, kv_heads, head_dim); returns the new cache and its full k, v."""
    at = (0, cache_index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), at)
    v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), at)
    return {"k": k_all, "v": v_all}, k_all, v_all


def make_cache(n_layers: int, batch: int, n_slots: int, kv_heads: int, head_dim: int, dtype):
    """A zero KV cache `{'k', 'v'}`, each (n_layers, batch, n_slots, kv_heads, head_dim)."""
    shape = (n_layers, batch, n_slots, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_cache(cfg: GPT2Config, batch: int, n_slots: int):
    """A zero KV cache for `cfg`: `{'k', 'v'}`, each (n_layers, batch, n_slots, heads, head_dim)."""
    if n_slots > cfg.n_positions:
        raise ValueError(f"GPT2: a cache of {n_slots} slots exceeds n_positions={cfg.n_positions}; "
                         "generate fewer tokens or shorten the prompt.")
    return make_cache(cfg.n_layers, batch, n_slots, cfg.n_head, cfg.head_dim, cfg.dtype)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention: (batch, seq, d_model) -> (batch, seq, d_model)."""

    cfg: GPT2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        """`side` = (mask, positions, cache_index) from the model; returns (out, layer cache)."""
        cfg = self.cfg
        mask, _, cache_index = side if side is not None else (causal_mask(x.shape[1]), None, None)
        qkv = nn.DenseGeneral(
            features=(3, cfg.n_head, cfg.head_dim),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_dense_init("embed", None, "heads", "kv"),
            bias_init=_zeros(None, "heads", "kv"),
            name="c_attn",
        )(x)  # (batch, seq, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            cache, k, v = update_cache(cache, k, v, cache_index)
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
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_dense_init("heads", "kv", "embed"),
            bias_init=_zeros("embed"),
            name="c_proj",
        )(out), cache


class GPT2MLP(nn.Module):
    """Position-wise MLP d_model -> 4*d_model -> d_model with tanh-approximated GELU."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        def dense(features, names, name):
            return nn.Dense(
                features,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_dense_init(*names),
                bias_init=_zeros(names[1]),
                name=name,
            )

        h = dense(4 * cfg.d_model, ("embed", "mlp"), "c_fc")(x)
        h = nn.gelu(h, approximate=True)
        return dense(cfg.d_model, ("mlp", "embed"), "c_proj")(h)


class GPT2Block(nn.Module):
    """Pre-LN transformer block. Returns `(x, new layer cache)` so it works under `nn.scan`."""

    cfg: GPT2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h, cache = GPT2Attention(cfg, self.deterministic, name="attn")(
            _layer_norm(cfg, "ln_1")(x), cache, side)
        x = x + drop(h)
        h = GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x))
        return x + drop(h), cache


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_policy(name: str):
    """``jax.checkpoint_policies.<name>``: what the backward pass keeps instead of recomputing
    ('nothing_saveable': full remat; 'dots_saveable': keep matmul outputs; ...)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; use one of {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


def build_layer_stack(block_cls, cfg, *, deterministic: bool, prefix: str):
    """Returns `(x, cache, side) -> (x, cache)` applying `cfg.n_layers` blocks, scanned or as
    `{prefix}_{i}`.

    Shared by GPT-2 and Llama; must be called inside a compact `__call__`. With `cfg.scan_layers`
    the params of all layers are stacked on axis 0 of one submodule named `prefix`. `cache` is
    None or `{'k', 'v'}` with the layer axis first (sliced per layer, restacked on the way out);
    `side` is what every layer shares (mask, positions, cache index), or None.
    """
    block = block_cls
    if cfg.remat:
        policy = remat_policy(getattr(cfg, "remat_policy", "nothing_saveable"))
        block = nn.remat(block_cls, prevent_cse=not cfg.scan_layers, policy=policy)
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast),
            metadata_params={nn.PARTITION_NAME: "layers"},
            length=cfg.n_layers,
        )(cfg, deterministic, name=prefix)
        return lambda x, cache=None, side=None: stack(x, cache, side)
    blocks = [block(cfg, deterministic, name=f"{prefix}_{i}") for i in range(cfg.n_layers)]

    def apply(x, cache=None, side=None):
        new = []
        for i, b in enumerate(blocks):
            layer = None if cache is None else jax.tree.map(lambda c: c[i], cache)
            x, layer = b(x, layer, side)
            new.append(layer)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *c: jnp.stack(c), *new)

    return apply


class GPT2(nn.Module):
    """GPT-2 language model: int32 tokens (batch, seq) -> float32 logits (batch, seq, vocab).

    `segment_ids` (batch, seq) int, for packed rows: 0 = padding, 1.. = the example; attention
    stays within a segment and positions restart at each (unless `positions` are given).
    With `cache` (from `init_cache`) it returns `(logits, cache)`, the tokens' keys and values
    written at slots `cache_index + arange(seq)`. `positions` (batch, seq) default to
    `arange(seq)`; `kv_mask` (batch, slots) is False at pad slots (slots = seq without a cache).
    """

    cfg: GPT2Config

    @nn.compact
    def __call__(self, tokens, segment_ids=None, *, deterministic: bool = True, positions=None,
                 kv_mask=None, cache=None, cache_index=None):
        cfg = self.cfg
        seq = tokens.shape[-1]
        if cache is not None and cache_index is None:
            raise ValueError("GPT2: decoding with a cache needs cache_index= (an int array)")
        positions = packed_positions("GPT2", segment_ids, positions, cache)
        if seq > cfg.n_positions:
            raise ValueError(
                f"GPT2: sequence length {seq} exceeds n_positions={cfg.n_positions}; "
                "truncate the input or raise n_positions in the config."
            )
        embed = lambda n, init, name: nn.Embed(
            n, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=init, name=name)
        wte = embed(cfg.vocab_size, _dense_init("vocab", "embed"), "wte")
        wpe = embed(cfg.n_positions, nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), "wpe")
        x = wte(tokens) + (wpe(jnp.arange(seq))[None] if positions is None else wpe(positions))
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        n_slots = seq if cache is None else cache["k"].shape[2]
        side = (attention_mask(seq, kv_mask, cache_index, n_slots, segment_ids), positions,
                cache_index)
        x, cache = build_layer_stack(GPT2Block, cfg, deterministic=deterministic, prefix="h")(
            x, cache, side)
        x = _layer_norm(cfg, "ln_f")(x)
        logits = wte.attend(x).astype(jnp.float32)
        return logits if cache is None else (logits, cache)
