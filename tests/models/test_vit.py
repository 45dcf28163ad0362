"""ViT: HF-layout checkpoints written here vs an independent numpy forward, names, presets, LoRA."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

import lora_jax as lj
from lora_jax.models import get_model, load_hf_vit, stack_layers
from lora_jax.sharding import LOGICAL_NAMES

VIT_HF = dict(model_type="vit", image_size=8, patch_size=4, num_channels=3, hidden_size=32,
              num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
              hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True,
              id2label={str(i): f"c{i}" for i in range(5)})
IMAGES = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)  # NCHW


def vit_weights(c, seed=0, classifier=True, pooler=False):
    """HF ViT tensors (torch layouts, HF names) for config `c`; 'vit.' prefixed if classifier."""
    rng = np.random.default_rng(seed)
    d, f, ch, p = c["hidden_size"], c["intermediate_size"], c["num_channels"], c["patch_size"]
    n = (c["image_size"] // p) ** 2
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
    w = {"embeddings.cls_token": r(1, 1, d), "embeddings.position_embeddings": r(1, n + 1, d),
         "embeddings.patch_embeddings.projection.weight": r(d, ch, p, p),
         "embeddings.patch_embeddings.projection.bias": r(d),
         "layernorm.weight": 1 + r(d), "layernorm.bias": r(d)}
    for i in range(c["num_hidden_layers"]):
        q = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w[f"{q}attention.attention.{name}.weight"] = r(d, d)
            w[f"{q}attention.attention.{name}.bias"] = r(d)
        w.update({q + "attention.output.dense.weight": r(d, d),
                  q + "attention.output.dense.bias": r(d),
                  q + "intermediate.dense.weight": r(f, d), q + "intermediate.dense.bias": r(f),
                  q + "output.dense.weight": r(d, f), q + "output.dense.bias": r(d),
                  q + "layernorm_before.weight": 1 + r(d), q + "layernorm_before.bias": r(d),
                  q + "layernorm_after.weight": 1 + r(d), q + "layernorm_after.bias": r(d)})
    if pooler:
        w.update({"pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)})
    if not classifier:
        return w
    w = {"vit." + k: x for k, x in w.items()}
    labels = len(c["id2label"])
    w.update({"classifier.weight": r(labels, d), "classifier.bias": r(labels)})
    return w


def write_checkpoint(path, config, weights):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    save_file(weights, os.path.join(path, "model.safetensors"))
    return str(path)


def numpy_vit(w, c, pixels):
    """HF ViT forward from HF tensors on NCHW pixels, in float64: logits, or CLS features."""
    w = {k.removeprefix("vit."): x.astype(np.float64) for k, x in w.items()}
    b, ch, hh, ww = pixels.shape
    p, h, eps = c["patch_size"], c["num_attention_heads"], c["layer_norm_eps"]
    # Patches in row-major order, each flattened as (channel, row, col) like the Conv2d weight.
    patches = pixels.reshape(b, ch, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, -1, ch * p * p)
    conv = w["embeddings.patch_embeddings.projection.weight"]
    bias = w["embeddings.patch_embeddings.projection.bias"]
    x = patches @ conv.reshape(conv.shape[0], -1).T + bias
    x = np.concatenate([np.broadcast_to(w["embeddings.cls_token"], (b, 1, x.shape[-1])), x], 1)
    x = x + w["embeddings.position_embeddings"]

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    lin = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]
    heads = lambda x: x.reshape(b, x.shape[1], h, -1).transpose(0, 2, 1, 3)
    gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
    for i in range(c["num_hidden_layers"]):
        q = f"encoder.layer.{i}."
        y = ln(x, q + "layernorm_before")
        qs, ks, vs = (heads(lin(y, f"{q}attention.attention.{n}"))
                      for n in ("query", "key", "value"))
        scores = qs @ ks.transpose(0, 1, 3, 2) / np.sqrt(qs.shape[-1])
        e = np.exp(scores - scores.max(-1, keepdims=True))
        a = (e / e.sum(-1, keepdims=True)) @ vs  # (b, heads, seq, head_dim), no mask
        x = x + lin(a.transpose(0, 2, 1, 3).reshape(x.shape), q + "attention.output.dense")
        y = gelu(lin(ln(x, q + "layernorm_after"), q + "intermediate.dense"))
        x = x + lin(y, q + "output.dense")
    cls = ln(x, "layernorm")[:, 0]
    return lin(cls, "classifier") if "classifier.weight" in w else cls


def _forward(module, params, pixels=IMAGES):
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return np.asarray(jax.jit(module.apply)({"params": params}, images))


@pytest.mark.parametrize("classifier,scan", [(True, False), (True, True), (False, False)])
def test_hf_vit_matches_numpy_reference(tmp_path, classifier, scan):
    weights = vit_weights(VIT_HF, classifier=classifier, pooler=not classifier)
    module, params = load_hf_vit(write_checkpoint(tmp_path, VIT_HF, weights), scan_layers=scan)
    assert module.cfg.num_classes == (5 if classifier else 0)
    assert ("blocks" in params) == scan
    out = _forward(module, params)
    assert out.shape == ((2, 5) if classifier else (2, 32))
    np.testing.assert_allclose(out, numpy_vit(weights, VIT_HF, IMAGES), atol=1e-4)


def test_hf_vit_mismatch_names_the_tensor(tmp_path):
    weights = vit_weights(VIT_HF)
    del weights["vit.encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.attention\.value\.bias"):
        load_hf_vit(write_checkpoint(tmp_path, VIT_HF, weights))
    weights = vit_weights({**VIT_HF, "intermediate_size": 48})
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*\(48, 32\)"):
        load_hf_vit(write_checkpoint(tmp_path, VIT_HF, weights))


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_known_logical_names(scan):
    model, cfg = get_model("vit", "tiny", scan_layers=scan)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim
        assert set(x.names) - {None} <= set(LOGICAL_NAMES)
    layer = boxed["blocks"] if scan else boxed["blocks_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].names[-3:] == ("embed", "heads", "kv")


def test_vit_b16_shapes_lower_with_the_published_parameter_count():
    model, cfg = get_model("vit", "vit-b/16", scan_layers=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 224, 224, 3)))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    assert n == 86_567_656  # ViT-B/16 with a 1000-class head
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), shapes, jnp.zeros((2, 224, 224, 3)))
    assert logits.shape == (2, 1000) and cfg.n_patches == 196


def _tiny_params(scan=False):
    model, cfg = get_model("vit", "tiny", scan_layers=scan)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 8, 8, 1)), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                          shapes)
    return model, params, images


def test_scanned_and_unscanned_match():
    model, params, images = _tiny_params()
    scanned, _ = get_model("vit", "tiny", scan_layers=True)
    want = jax.jit(model.apply)({"params": params}, images)
    got = jax.jit(scanned.apply)({"params": stack_layers(params, "blocks")}, images)
    np.testing.assert_allclose(got, want, atol=1e-5)


PRESET_LAYERS = {"qv": {"q_proj", "v_proj"}, "attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
                 "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}}


@pytest.mark.parametrize("preset", PRESET_LAYERS)
def test_target_presets_select_the_vit_layers(preset):
    _, params, _ = _tiny_params()
    paths = [t.path for t in lj.select_targets(params, [preset], rank=4, alpha=8.0)]
    assert {p.split("/")[-2] for p in paths} == PRESET_LAYERS[preset]
    assert len(paths) == 2 * len(PRESET_LAYERS[preset])  # every block


@pytest.mark.parametrize("method,scan", [("lora", False), ("dora", True)])
def test_adapters_on_conv_and_attention_factored_equals_merged(method, scan):
    model, params, images = _tiny_params(scan)
    assert ("blocks" in params) == scan
    layouts = lj.trace_layouts(model, params, images)
    assert layouts["patch_embed/kernel"].kind == "conv"
    spec = lj.LoraSpec(rank=2, alpha=4.0, method=method,
                       targets=("all-linear", r"patch_embed/kernel"))
    adapters = lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    # The init leaves B = 0; shift the trainable leaves so the adapters change the output.
    trainable, state = lj.split(adapters)
    adapters = lj.join(jax.tree.map(lambda x: x + 0.1, trainable), state)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    base = forward(params, images)
    factored = jax.jit(lambda p, a, x: lj.apply(model, p, a, x))(params, adapters, images)
    merged = forward(jax.jit(lj.merge)(params, adapters), images)
    assert np.abs(np.asarray(factored - base)).max() > 1e-2
    np.testing.assert_allclose(factored, merged, atol=1e-4)


def test_wrong_image_shape_names_the_fix():
    model, params, _ = _tiny_params()
    with pytest.raises(ValueError, match="channels-last"):
        model.apply({"params": params}, jnp.zeros((1, 1, 8, 8)))
