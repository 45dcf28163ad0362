"""GPT-2 specifics: presets, parameter count, kernel layouts that LoRA target presets rely on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import GPT2, GPT2Config, gpt2_config


def _param_shapes(cfg):
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT2(cfg).init(jax.random.key(0), tokens))
    return nn.meta.unbox(shapes["params"])


def test_small_has_124m_params():
    shapes = _param_shapes(gpt2_config("small"))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 124_439_808


@pytest.mark.parametrize("preset,d_model,layers", [("tiny", 128, 4), ("medium", 1024, 24),
                                                   ("large", 1280, 36), ("xl", 1600, 48)])
def test_presets(preset, d_model, layers):
    cfg = gpt2_config(preset)
    assert (cfg.d_model, cfg.n_layers) == (d_model, layers)
    assert cfg.dropout_rate == 0.0 and cfg.dtype == jnp.float32 and cfg.param_dtype == jnp.float32


def test_overrides_and_frozen():
    cfg = gpt2_config("tiny", n_layers=2, scan_layers=True)
    assert cfg.n_layers == 2 and cfg.scan_layers
    with pytest.raises(Exception):
        cfg.n_layers = 3


def test_kernel_layouts():
    cfg = gpt2_config("tiny")
    p = _param_shapes(cfg)
    d, h, hd = 128, 4, 32
    assert set(p) == {"wte", "wpe", "ln_f"} | {f"h_{i}" for i in range(4)}
    assert p["wte"]["embedding"].shape == (512, d)
    assert p["wpe"]["embedding"].shape == (128, d)
    blk = p["h_0"]
    assert blk["attn"]["c_attn"]["kernel"].shape == (d, 3, h, hd)
    assert blk["attn"]["c_attn"]["bias"].shape == (3, h, hd)
    assert blk["attn"]["c_proj"]["kernel"].shape == (h, hd, d)
    assert blk["mlp"]["c_fc"]["kernel"].shape == (d, 4 * d)
    assert blk["mlp"]["c_proj"]["kernel"].shape == (4 * d, d)
    assert set(blk["ln_1"]) == {"scale", "bias"}


def test_logical_names():
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: GPT2(gpt2_config("tiny")).init(jax.random.key(0), tokens))
    spec = nn.get_partition_spec(variables)["params"]
    P = jax.sharding.PartitionSpec
    assert spec["wte"]["embedding"] == P("vocab", "embed")
    assert spec["wpe"]["embedding"] == P(None, "embed")
    assert spec["h_0"]["attn"]["c_attn"]["kernel"] == P("embed", None, "heads", "kv")
    assert spec["h_0"]["attn"]["c_attn"]["bias"] == P(None, "heads", "kv")
    assert spec["h_0"]["attn"]["c_proj"]["kernel"] == P("heads", "kv", "embed")
    assert spec["h_0"]["mlp"]["c_fc"]["kernel"] == P("embed", "mlp")
    assert spec["h_0"]["mlp"]["c_proj"]["kernel"] == P("mlp", "embed")
    assert spec["ln_f"]["scale"] == P("embed")


def test_bad_head_count_raises():
    with pytest.raises(ValueError, match="n_head"):
        GPT2Config(d_model=100, n_head=3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_remat_policies_give_the_same_loss_and_gradients(family):
    from lora_jax.models import get_model
    from lora_jax.models.gpt2 import REMAT_POLICIES

    small = (dict(d_model=32, n_layers=2, n_head=2, vocab_size=64, n_positions=16)
             if family == "gpt2" else
             dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=64,
                  max_seq_len=16))
    x = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    plain, _ = get_model(family, "tiny", **small)
    params = plain.init(jax.random.key(1), x)["params"]
    loss = lambda m: jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, x) ** 2))(params)
    want, want_g = loss(plain)
    for policy in REMAT_POLICIES:
        model, _ = get_model(family, "tiny", remat=True, remat_policy=policy, **small)
        got, got_g = loss(model)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown remat_policy"):
        get_model(family, "tiny", remat=True, remat_policy="some", **small)[0].init(
            jax.random.key(1), x)
