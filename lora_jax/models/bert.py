"""BERT (post-LN encoder, as Hugging Face `BertModel`) as a Flax linen module, with its heads.

`Bert` maps int32 tokens (batch, seq), optional token types and a padding mask to the last hidden
states (batch, seq, d_model) and a pooled sentence vector (batch, d_model): the `pooler` (dense +
tanh on the first, [CLS], token) for `pooling='cls'`, or the mask-weighted mean of the hidden
states for `pooling='mean'` (what sentence-transformers does for all-MiniLM-L6-v2; that model has
no pooler then). `BertClassifier` puts a linear `classifier` on the pooled vector, and
`BertTokenClassifier` one on every token. Projections are stock `nn.Dense` / `nn.DenseGeneral` /
`nn.Embed` with logical axis names, and the module names follow the Llama family's
(`layers_{i}` or a scanned `layers`, `self_attn/{q,k,v,o}_proj`, `mlp/{up,down}_proj`), so the
LoRA target presets `qv`, `attn` and `all-linear` select BERT's kernels unchanged. Loading HF
checkpoints lives in `hf_bert.py`; training lives elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.models.gpt2 import build_layer_stack

Dtype = Any
_INIT_STD = 0.02
POOLINGS = ("cls", "mean")
HEADS = ("none", "sequence", "token")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder and its head; `head_dim = d_model // n_heads`.

    `head`: 'none' (the encoder, `Bert`), 'sequence' (`BertClassifier`, `n_labels` logits per
    example) or 'token' (`BertTokenClassifier`, `n_labels` logits per token).
    """

    vocab_size: int = 512
    max_positions: int = 128
    type_vocab_size: int = 2
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    layer_norm_eps: float = 1e-12
    pad_id: int = 0
    pooling: str = "cls"
    head: str = "none"
    n_labels: int = 2
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"BertConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads that divides d_model.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"BertConfig: pooling={self.pooling!r}; valid: {POOLINGS}.")
        if self.head not in HEADS:
            raise ValueError(f"BertConfig: head={self.head!r}; valid: {HEADS}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_PRESETS = {
    "tiny": dict(vocab_size=512, max_positions=128, d_model=64, n_layers=2, n_heads=4, d_ff=256),
    # sentence-transformers/all-MiniLM-L6-v2 (BERT shapes, uncased WordPiece vocab).
    "minilm-l6": dict(vocab_size=30522, max_positions=512, d_model=384, n_layers=6, n_heads=12,
                      d_ff=1536, pooling="mean"),
    "bert-base": dict(vocab_size=30522, max_positions=512, d_model=768, n_layers=12, n_heads=12,
                      d_ff=3072),
}


def bert_config(preset: str = "tiny", **overrides) -> BertConfig:
    """Returns the named BERT preset ('tiny', 'minilm-l6', 'bert-base') with overrides.

    Example: `bert_config('minilm-l6', head='sequence', n_labels=3)`.
    """
    if preset not in _PRESETS:
        raise ValueError(f"Unknown BERT preset {preset!r}; valid presets: {sorted(_PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"Unknown BertConfig field(s) {bad}; valid fields: {sorted(fields)}.")
    return BertConfig(**{**_PRESETS[preset], **overrides})


def _init(*names):
    return nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), names)


def _zeros(*names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros("embed"), name=name)


def _dense(cfg: BertConfig, features, names, name, axis=-1) -> nn.DenseGeneral:
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features, axis=axis, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_init(*names), bias_init=_zeros(*names[-n_out:]), name=name)


class BertAttention(nn.Module):
    """Bidirectional multi-head self-attention: (batch, seq, d), key mask -> (batch, seq, d)."""

    cfg: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        heads = (cfg.n_heads, cfg.head_dim)
        q, k, v = (_dense(cfg, heads, ("embed", "heads", "kv"), f"{n}_proj")(x) for n in "qkv")
        use_dropout = not self.deterministic and cfg.dropout_rate > 0.0
        out = nn.dot_product_attention(
            q, k, v, mask=mask[:, None, None, :],
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dropout_rate=cfg.dropout_rate, deterministic=not use_dropout, dtype=cfg.dtype,
            force_fp32_for_softmax=True)  # (batch, seq, heads, head_dim)
        return _dense(cfg, cfg.d_model, ("heads", "kv", "embed"), "o_proj", axis=(-2, -1))(out)


class BertBlock(nn.Module):
    """Post-LN block: `x = LN(x + attn(x))`, `x = LN(x + mlp(x))`, exact-erf GELU MLP.

    Called as `block((x, mask), None) -> ((x', mask), None)` so it also works under `nn.scan`.
    """

    cfg: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cache=None, side=None):
        """``side`` is the padding mask (the layer stack's shared argument); no KV cache."""
        mask = side
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        h = BertAttention(cfg, self.deterministic, name="self_attn")(x, mask)
        x = _layer_norm(cfg, "attn_norm")(x + drop(h))
        h = BertMLP(cfg, name="mlp")(x)
        return _layer_norm(cfg, "mlp_norm")(x + drop(h)), cache


class BertMLP(nn.Module):
    """d_model -> d_ff -> d_model with exact (erf) GELU, HF's `hidden_act='gelu'`."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = nn.gelu(_dense(cfg, cfg.d_ff, ("embed", "mlp"), "up_proj")(x), approximate=False)
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")(h)


def mean_pool(hidden, mask):
    """Mask-weighted mean over tokens: (batch, seq, d), (batch, seq) -> (batch, d).

    As sentence-transformers: padded tokens are excluded and the count is clamped at 1e-9.
    """
    m = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class Bert(nn.Module):
    """BERT encoder: tokens (batch, seq) -> (hidden (batch, seq, d), pooled (batch, d)).

    `token_types` default to 0; `mask` (True/1 = real token) defaults to `tokens != cfg.pad_id`
    (Hugging Face defaults to all ones: pass `mask` explicitly to reproduce that).
    """

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens, token_types=None, mask=None, *, deterministic: bool = True):
        cfg = self.cfg
        seq = tokens.shape[-1]
        if seq > cfg.max_positions:
            raise ValueError(
                f"Bert: sequence length {seq} exceeds max_positions={cfg.max_positions}; "
                "truncate the input or raise max_positions in the config.")
        mask = (tokens != cfg.pad_id) if mask is None else mask.astype(bool)
        token_types = jnp.zeros_like(tokens) if token_types is None else token_types
        embed = lambda n, names, name: nn.Embed(
            n, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init(*names), name=name)
        x = (embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(tokens)
             + embed(cfg.max_positions, (None, "embed"), "position_embeddings")(
                 jnp.arange(seq))[None]
             + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_types))
        x = _layer_norm(cfg, "embed_norm")(x)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        stack = build_layer_stack(BertBlock, cfg, deterministic=deterministic, prefix="layers")
        hidden, _ = stack(x, None, mask)
        if cfg.pooling == "mean":
            return hidden, mean_pool(hidden, mask)
        pooled = jnp.tanh(_dense(cfg, cfg.d_model, ("embed", "mlp"), "pooler")(hidden[:, 0]))
        return hidden, pooled


class BertClassifier(nn.Module):
    """`Bert` + linear head on the pooled vector: tokens (batch, seq) -> (batch, n_labels)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens, token_types=None, mask=None, *, deterministic: bool = True):
        cfg = self.cfg
        _, pooled = Bert(cfg, name="bert")(tokens, token_types, mask, deterministic=deterministic)
        pooled = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(pooled)
        logits = _dense(cfg, cfg.n_labels, ("embed", None), "classifier")(pooled)
        return logits.astype(jnp.float32)


class BertTokenClassifier(nn.Module):
    """`Bert` + linear head per token: tokens (batch, seq) -> logits (batch, seq, n_labels)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, tokens, token_types=None, mask=None, *, deterministic: bool = True):
        cfg = self.cfg
        hidden, _ = Bert(cfg, name="bert")(tokens, token_types, mask, deterministic=deterministic)
        hidden = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(hidden)
        logits = _dense(cfg, cfg.n_labels, ("embed", None), "classifier")(hidden)
        return logits.astype(jnp.float32)


def bert_module(cfg: BertConfig) -> nn.Module:
    """The module for `cfg.head`: `Bert`, `BertClassifier` or `BertTokenClassifier`."""
    return {"none": Bert, "sequence": BertClassifier, "token": BertTokenClassifier}[cfg.head](cfg)
