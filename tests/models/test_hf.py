"""Hugging Face loading: tiny HF-layout checkpoints vs an independent numpy forward pass."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_jax.models import load_hf_checkpoint

SEQ = 7
TOKENS = np.random.default_rng(0).integers(0, 48, size=(2, SEQ)).astype(np.int32)

GPT2_HF = dict(model_type="gpt2", vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4,
               layer_norm_epsilon=1e-5, activation_function="gelu_new", n_inner=None)
LLAMA_HF = dict(model_type="llama", vocab_size=48, hidden_size=32, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=16,
                tie_word_embeddings=False, rope_scaling=None)


# ----------------------------------------------------------------------------- HF weights


def gpt2_weights(c, seed=0, prefix="transformer."):
    rng = np.random.default_rng(seed)
    d, f, v = c["n_embd"], 4 * c["n_embd"], c["vocab_size"]
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    w = {"wte.weight": r(v, d), "wpe.weight": r(c["n_positions"], d),
         "ln_f.weight": 1 + r(d), "ln_f.bias": r(d)}
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        w.update({p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d),
                  p + "ln_2.weight": 1 + r(d), p + "ln_2.bias": r(d),
                  p + "attn.c_attn.weight": r(d, 3 * d), p + "attn.c_attn.bias": r(3 * d),
                  p + "attn.c_proj.weight": r(d, d), p + "attn.c_proj.bias": r(d),
                  p + "mlp.c_fc.weight": r(d, f), p + "mlp.c_fc.bias": r(f),
                  p + "mlp.c_proj.weight": r(f, d), p + "mlp.c_proj.bias": r(d),
                  # A causal-mask buffer, as in older HF GPT-2 checkpoints; must be ignored.
                  p + "attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32))})
    return {prefix + k: x for k, x in w.items()}


def llama_weights(c, seed=0):
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    w = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": 1 + r(d)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = r(v, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + r(d),
                  p + "post_attention_layernorm.weight": 1 + r(d),
                  p + "self_attn.q_proj.weight": r(q, d), p + "self_attn.k_proj.weight": r(kv, d),
                  p + "self_attn.v_proj.weight": r(kv, d), p + "self_attn.o_proj.weight": r(d, q),
                  p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d),
                  p + "mlp.down_proj.weight": r(d, f)})
    return w


def write_checkpoint(path, config, weights, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    if shards == 1:
        save_file(weights, os.path.join(path, "model.safetensors"))
        return str(path)
    keys = sorted(weights)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[s::shards]}
        save_file(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return str(path)


# ----------------------------------------------------------------------------- numpy reference


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v):
    """q, k, v: (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    b, h, s, hd = q.shape
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    return (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(b, s, h * hd)


def numpy_gpt2(w, c, tokens):
    """GPT-2 forward pass straight from HF tensors (Conv1D weights are (in, out)), in float64."""
    w = {k.removeprefix("transformer."): x.astype(np.float64) for k, x in w.items()}
    eps, h = c["layer_norm_epsilon"], c["n_head"]

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def heads(x):
        b, s, d = x.shape
        return x.reshape(b, s, h, d // h).transpose(0, 2, 1, 3)

    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    x = w["wte.weight"][tokens] + w["wpe.weight"][: tokens.shape[1]]
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        a = _causal_attention(heads(q), heads(k), heads(v))
        x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = gelu(ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ w["wte.weight"].T


def numpy_llama(w, c, tokens):
    """Llama forward pass from HF tensors (torch Linear weights are (out, in)), in float64."""
    w = {k: x.astype(np.float64) for k, x in w.items()}
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // h
    s = tokens.shape[1]

    def rms(x, name):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c["rms_norm_eps"]) * w[name]

    inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(np.arange(s), inv_freq)] * 2, axis=-1)  # (seq, head_dim)
    cos, sin = np.cos(emb), np.sin(emb)
    rotate_half = lambda x: np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    rope = lambda x: x * cos + rotate_half(x) * sin

    def heads(x, n):
        return x.reshape(x.shape[0], s, n, hd).transpose(0, 2, 1, 3)

    silu = lambda x: x / (1 + np.exp(-x))
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms(x, p + "input_layernorm.weight")
        q = rope(heads(y @ w[p + "self_attn.q_proj.weight"].T, h))
        k = rope(heads(y @ w[p + "self_attn.k_proj.weight"].T, kv))
        v = heads(y @ w[p + "self_attn.v_proj.weight"].T, kv)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # repeat_kv
        x = x + _causal_attention(q, k, v) @ w[p + "self_attn.o_proj.weight"].T
        y = rms(x, p + "post_attention_layernorm.weight")
        m = silu(y @ w[p + "mlp.gate_proj.weight"].T) * (y @ w[p + "mlp.up_proj.weight"].T)
        x = x + m @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, "model.norm.weight")
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------- tests


def _logits(module, params):
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(TOKENS)))


def _assert_unboxed_init_structure(module, params):
    init = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(TOKENS)))
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(init["params"]))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == want
    assert not any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
@pytest.mark.parametrize("scan", [False, True])
def test_gpt2_matches_numpy_reference(tmp_path, prefix, scan):
    weights = gpt2_weights(GPT2_HF, prefix=prefix)
    path = write_checkpoint(tmp_path / "gpt2", GPT2_HF, weights)
    module, params = load_hf_checkpoint(path, scan_layers=scan)
    _assert_unboxed_init_structure(module, params)
    assert ("h" in params) == scan and ("h_0" in params) != scan
    np.testing.assert_allclose(_logits(module, params), numpy_gpt2(weights, GPT2_HF, TOKENS),
                               atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scan", [False, True])
def test_llama_matches_numpy_reference(tmp_path, tied, scan):
    config = {**LLAMA_HF, "tie_word_embeddings": tied}
    weights = llama_weights(config)
    path = write_checkpoint(tmp_path / "llama", config, weights, shards=1 if tied else 3)
    module, params = load_hf_checkpoint(path, scan_layers=scan)
    _assert_unboxed_init_structure(module, params)
    assert module.cfg.n_kv_heads == 2 and module.cfg.tie_embeddings == tied
    assert params["layers" if scan else "layers_0"]["self_attn"]["k_proj"]["kernel"].shape[-2:] \
        == (2, 8)
    np.testing.assert_allclose(_logits(module, params), numpy_llama(weights, config, TOKENS),
                               atol=1e-4)


def test_param_dtype_and_dtype_are_applied(tmp_path):
    path = write_checkpoint(tmp_path / "g", GPT2_HF, gpt2_weights(GPT2_HF))
    module, params = load_hf_checkpoint(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert module.cfg.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert _logits(module, params).dtype == np.float32


def _bad(tmp_path, config=GPT2_HF, weights=None, drop=(), add=None):
    weights = dict(weights if weights is not None else gpt2_weights(config))
    for k in drop:
        weights.pop(k)
    weights.update(add or {})
    return write_checkpoint(tmp_path / "bad", config, weights)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(tmp_path))
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(GPT2_HF, fh)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(str(tmp_path))


def test_missing_shard_raises(tmp_path):
    path = write_checkpoint(tmp_path / "s", LLAMA_HF, llama_weights(LLAMA_HF), shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_hf_checkpoint(path)


def test_unknown_model_type_raises(tmp_path):
    path = _bad(tmp_path, config={**GPT2_HF, "model_type": "t5"})
    with pytest.raises(ValueError, match="unknown model_type 't5'"):
        load_hf_checkpoint(path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = _bad(tmp_path, drop=["transformer.h.1.mlp.c_fc.bias"],
                add={"transformer.h.2.ln_1.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"missing keys \['h.1.mlp.c_fc.bias'\].*"
                                         r"unexpected keys \['h.2.ln_1.weight'\]"):
        load_hf_checkpoint(path)


def test_shape_mismatch_is_named(tmp_path):
    path = _bad(tmp_path, config=LLAMA_HF, weights=llama_weights(LLAMA_HF),
                add={"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight'.*\(32, 32\)"
                                         r".*\(16, 32\)"):
        load_hf_checkpoint(path)


def test_unsupported_rope_scaling_raises(tmp_path):
    config = {**LLAMA_HF, "rope_scaling": {"type": "linear", "factor": 2.0}}
    path = _bad(tmp_path, config=config, weights=llama_weights(LLAMA_HF))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_hf_checkpoint(path)
