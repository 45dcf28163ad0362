"""Llama specifics: presets, parameter counts, GQA layouts, tied embeddings, RoPE convention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import Llama, LlamaConfig, llama_config
from lora_jax.models.llama import apply_rope


def _param_shapes(cfg):
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), tokens))
    return nn.meta.unbox(shapes["params"])


def _count(shapes):
    return sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_llama2_7b_param_count():
    assert _count(_param_shapes(llama_config("llama2-7b"))) == 6_738_415_616


def test_llama2_70b_uses_gqa():
    cfg = llama_config("llama2-70b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (
        8192, 80, 64, 8, 28672)


def test_gqa_kernel_layouts_and_names():
    cfg = llama_config("tiny")
    p = _param_shapes(cfg)
    attn = p["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (128, 4, 32)
    assert attn["k_proj"]["kernel"].shape == (128, 2, 32)
    assert attn["v_proj"]["kernel"].shape == (128, 2, 32)
    assert attn["o_proj"]["kernel"].shape == (4, 32, 128)
    assert all(set(v) == {"kernel"} for v in attn.values())  # no biases
    mlp = p["layers_0"]["mlp"]
    assert mlp["gate_proj"]["kernel"].shape == (128, 344)
    assert mlp["down_proj"]["kernel"].shape == (344, 128)
    assert p["lm_head"]["kernel"].shape == (128, 512)
    tokens = jnp.zeros((1, 4), jnp.int32)
    spec = nn.get_partition_spec(jax.eval_shape(
        lambda: Llama(cfg).init(jax.random.key(0), tokens)))["params"]
    P = jax.sharding.PartitionSpec
    assert spec["embed_tokens"]["embedding"] == P("vocab", "embed")
    assert spec["layers_0"]["self_attn"]["q_proj"]["kernel"] == P("embed", "heads", "kv")
    assert spec["layers_0"]["self_attn"]["k_proj"]["kernel"] == P("embed", "kv_heads", "kv")
    assert spec["layers_0"]["self_attn"]["o_proj"]["kernel"] == P("heads", "kv", "embed")
    assert spec["layers_0"]["mlp"]["up_proj"]["kernel"] == P("embed", "mlp")
    assert spec["layers_0"]["mlp"]["down_proj"]["kernel"] == P("mlp", "embed")
    assert spec["layers_0"]["input_layernorm"]["scale"] == P("embed")
    assert spec["lm_head"]["kernel"] == P("embed", "vocab")


def test_tied_embeddings_drop_lm_head():
    p = _param_shapes(llama_config("tiny", tie_embeddings=True))
    assert "lm_head" not in p


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA (kv head j serves query heads j*g..j*g+g-1) equals MHA with repeated k/v kernels."""
    gqa = Llama(llama_config("tiny", vocab_size=64, n_layers=1))
    mha = Llama(llama_config("tiny", vocab_size=64, n_layers=1, n_kv_heads=4))
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    params = nn.meta.unbox(gqa.init(jax.random.key(0), tokens)["params"])
    attn = dict(params["layers_0"]["self_attn"])
    for name in ("k_proj", "v_proj"):
        attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], 2, axis=1)}
    mha_params = {**params, "layers_0": {**params["layers_0"], "self_attn": attn}}
    np.testing.assert_allclose(gqa.apply({"params": params}, tokens),
                               mha.apply({"params": mha_params}, tokens), atol=1e-5)


def test_rope_rotates_half_pairs_and_keeps_norm():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    y = apply_rope(x, 10000.0)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Dimension i pairs with i + head_dim/2 (HF rotate_half), at angle pos * theta^(-2i/d).
    angle = 1.0 * 10000.0 ** (-0 / 8)
    want = x[0, 1, 0, 0] * np.cos(angle) - x[0, 1, 0, 4] * np.sin(angle)
    np.testing.assert_allclose(y[0, 1, 0, 0], want, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=130, n_heads=4), "n_heads"),
    (dict(d_model=12, n_heads=4, n_kv_heads=4), "odd"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kwargs)
