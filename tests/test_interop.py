"""PEFT files both ways, merged HF exports, HF configs: against files real PEFT/transformers wrote.

The fixtures under tests/fixtures/peft/ and tests/fixtures/hf_configs/ were written by
`make_fixtures.py` / `make_configs.py` beside them (torch, peft, transformers 4 and 5); these
tests need none of those libraries.
"""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax import interop, rules
from lora_jax.models import config_from_hf, load_hf_checkpoint
from lora_jax.models.hf import config_to_hf
from lora_jax.models.llama import rope_inv_freq

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT = os.path.join(HERE, "fixtures", "peft")
CONFIGS = os.path.join(HERE, "fixtures", "hf_configs")
TOKENS = np.array(json.load(open(os.path.join(PEFT, "tokens.json"))), np.int32)

FIXTURES = [("gpt2_lora", "gpt2_base"), ("gpt2_dora", "gpt2_base"),
            ("llama_pattern", "llama_base"), ("llama_dora", "llama_base"),
            ("llama_tied_lora", "llama_tied_base")]


def _load(base, scan=False):
    model, params = load_hf_checkpoint(os.path.join(PEFT, base), scan_layers=scan)
    return model, params, lj.trace_layouts(model, params, TOKENS)


def _np(x):
    return np.asarray(x, np.float32)


# ----------------------------------------------------------------------------- PEFT -> lora_jax


@pytest.mark.parametrize("base", ["gpt2_base", "llama_base", "llama_tied_base"])
def test_hf_base_reproduces_transformers_logits(base):
    model, params, _ = _load(base)
    ref = np.load(os.path.join(PEFT, base, "logits.npy"))
    np.testing.assert_allclose(_np(model.apply({"params": params}, TOKENS)), ref, atol=1e-4)


def test_llama3_rope_scaling_matters_for_the_fixture():
    model, params, _ = _load("llama_base")
    assert model.cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
    plain = type(model)(dataclasses.replace(model.cfg, rope_llama3=None))
    ref = np.load(os.path.join(PEFT, "llama_base", "logits.npy"))
    assert np.abs(_np(plain.apply({"params": params}, TOKENS)) - ref).max() > 1e-2


def test_llama3_inv_freq_bands():
    # head_dim 8, θ=1e4: wavelengths 2π·(1, 10, 100, 1000) against the band [64/4, 64/1].
    got = np.asarray(rope_inv_freq(8, 10000.0, (8.0, 1.0, 4.0, 64)))
    base = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    smooth = (64 / (2 * np.pi / base[1]) - 1.0) / (4.0 - 1.0)
    want = [base[0], (1 - smooth) * base[1] / 8 + smooth * base[1], base[2] / 8, base[3] / 8]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("adapter,base,scan", [f + (False,) for f in FIXTURES] + [
    ("gpt2_lora", "gpt2_base", True), ("llama_dora", "llama_base", True)])
def test_load_peft_reproduces_peft_logits(adapter, base, scan):
    model, params, layouts = _load(base, scan)
    adapters = interop.load_peft(os.path.join(PEFT, adapter), params, layouts)
    ref = np.load(os.path.join(PEFT, adapter, "logits.npy"))
    base_ref = np.load(os.path.join(PEFT, base, "logits.npy"))
    assert np.abs(ref - base_ref).max() > 0.5  # the adapter matters
    np.testing.assert_allclose(_np(lj.apply(model, params, adapters, TOKENS)), ref, atol=1e-4)
    merged = lj.merge(params, adapters)
    np.testing.assert_allclose(_np(model.apply({"params": merged}, TOKENS)), ref, atol=1e-4)


def test_rank_and_alpha_patterns_are_read():
    _, params, layouts = _load("llama_base")
    flat = rules.flatten(interop.load_peft(os.path.join(PEFT, "llama_pattern"), params, layouts))
    assert flat["layers_0/self_attn/o_proj/kernel"].rank == 2
    assert flat["layers_1/mlp/down_proj/kernel"].rank == 6
    assert flat["layers_0/mlp/down_proj/kernel"].rank == 4
    # rsLoRA: s = alpha / sqrt(r).
    assert flat["layers_0/self_attn/v_proj/kernel"].scale == pytest.approx(3 / 2)
    assert flat["embed_tokens/embedding"].scale == pytest.approx(16 / 2)
    assert flat["layers_0/self_attn/q_proj/kernel"].scale == pytest.approx(8 / 2)


def test_scanned_stack_with_per_layer_ranks_is_refused():
    _, params, layouts = _load("llama_base", scan=True)
    with pytest.raises(ValueError, match=r"layers/mlp/down_proj/kernel.*scan_layers=False"):
        interop.load_peft(os.path.join(PEFT, "llama_pattern"), params, layouts)


# ----------------------------------------------------------------------------- refusals


def _copy(tmp_path, name, config=None, tensors=None):
    out = tmp_path / name
    shutil.copytree(os.path.join(PEFT, name), out)
    if config:
        cfg = json.load(open(out / "adapter_config.json"))
        cfg.update(config)
        json.dump(cfg, open(out / "adapter_config.json", "w"))
    if tensors:
        t = load_file(str(out / "adapter_model.safetensors"))
        save_file(tensors(t), str(out / "adapter_model.safetensors"))
    return out


def test_pickle_is_refused_with_conversion_hint(tmp_path):
    out = _copy(tmp_path, "gpt2_lora")
    os.rename(out / "adapter_model.safetensors", out / "adapter_model.bin")
    _, params, layouts = _load("gpt2_base")
    with pytest.raises(ValueError, match=r"(?s)adapter_model.bin.*safetensors.torch import save_file"):
        interop.load_peft(out, params, layouts)


@pytest.mark.parametrize("config,match", [
    ({"layer_replication": [[0, 2]]}, r"\['layer_replication'\]"),
    ({"use_qalora": True, "trainable_token_indices": [1]}, r"trainable_token_indices.*use_qalora"),
    ({"peft_type": "IA3"}, r"peft_type 'IA3'"),
    ({"bias": "all"}, r"bias='all'"),
])
def test_unsupported_config_features_are_named(tmp_path, config, match):
    out = _copy(tmp_path, "gpt2_lora", config=config)
    _, params, layouts = _load("gpt2_base")
    with pytest.raises(ValueError, match=match):
        interop.load_peft(out, params, layouts)


def test_unknown_module_and_bad_shape_are_named(tmp_path):
    _, params, layouts = _load("gpt2_base")
    p = "base_model.model.transformer.h.0.attn."
    rename = lambda t: {k.replace("attn.c_proj", "attn.q_proj"): v for k, v in t.items()}
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.q_proj' does not exist"):
        interop.load_peft(_copy(tmp_path / "a", "gpt2_lora", tensors=rename), params, layouts)
    crop = lambda t: {**t, p + "c_attn.lora_B.weight": t[p + "c_attn.lora_B.weight"][:32]}
    with pytest.raises(ValueError, match=r"c_attn'.*lora_B has shape \(32, 4\).*\(96, 4\)"):
        interop.load_peft(_copy(tmp_path / "b", "gpt2_lora", tensors=crop), params, layouts)


def test_peft_default_untied_head_loads_as_tie_head_false(tmp_path):
    """PEFT's default (ensure_weight_tying=false) adapts the tied table and leaves the LM head on
    the base table: it loads as LoraSpec(tie_head=False) and saves back the same way."""
    drop_head = lambda t: {k: v for k, v in t.items() if ".lm_head." not in k}
    out = _copy(tmp_path / "in", "llama_tied_lora", config={"ensure_weight_tying": False},
                tensors=drop_head)
    model, params, layouts = _load("llama_tied_base")
    untied = interop.load_peft(out, params, layouts)
    table = lj.rules.flatten(untied)["embed_tokens/embedding"]
    assert table.tied_head is False
    tied = interop.load_peft(_copy(tmp_path / "tied", "llama_tied_lora"), params, layouts)
    y_untied = lj.apply(model, params, untied, TOKENS)
    assert float(jnp.max(jnp.abs(y_untied - lj.apply(model, params, tied, TOKENS)))) > 1e-4
    interop.save_peft(tmp_path / "out", params, untied)
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["ensure_weight_tying"] is False
    back = interop.load_peft(tmp_path / "out", params, layouts)
    np.testing.assert_allclose(lj.apply(model, params, back, TOKENS), y_untied, atol=1e-5)


def test_gpt2_wte_adapter_cannot_be_saved_for_peft(tmp_path):
    _, params, _ = _load("gpt2_base")
    adapters = lj.init_adapters(params, lj.LoraSpec(targets=("wte/embedding",)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'wte'.*save_hf"):
        interop.save_peft(tmp_path, params, adapters)


# ----------------------------------------------------------------------------- lora_jax -> PEFT


ROUND_TRIPS = {  # name: (base, scan, LoraSpec kwargs, rslora)
    "gpt2_rules": ("gpt2_base", False, dict(rank=4, alpha=8.0, rslora=True, targets=(
        lj.Rule(r"h_0/attn/c_proj/kernel", 2, 3.0), r".*/attn/c_attn/kernel",
        r".*/mlp/c_fc/kernel", r"wpe/embedding")), True),
    "gpt2_dora_scan": ("gpt2_base", True, dict(rank=2, alpha=4.0, method="dora",
                                               targets=("all-linear",)), False),
    "llama_scan": ("llama_base", True, dict(rank=4, alpha=16.0, targets=(
        lj.Rule(r".*/o_proj/kernel", 2, 5.0), "all-linear", "embed_tokens/embedding",
        "lm_head/kernel")), False),
    "llama_tied": ("llama_tied_base", False, dict(rank=4, alpha=4.0, targets=(
        "qv", "embed_tokens/embedding")), False),
}


def _perturbed(params, spec, layouts, seed):
    adapters = lj.init_adapters(params, spec, jax.random.key(seed), layouts=layouts)
    rng = np.random.default_rng(seed)  # numpy: no compile per leaf shape
    trainable, state = lj.split(adapters)
    trainable = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32),
                             trainable)
    return lj.join(trainable, state)


def _peft_selects(config, module):
    """PEFT's list rule for target_modules: equal, or ends with '.' + entry."""
    return any(module == t or module.endswith("." + t) for t in config["target_modules"])


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_identical_adapters_and_logits(tmp_path, name):
    base, scan, kw, rslora = ROUND_TRIPS[name]
    model, params, layouts = _load(base, scan)
    adapters = _perturbed(params, lj.LoraSpec(**kw), layouts, seed=len(name))
    interop.save_peft(tmp_path, params, adapters, rslora=rslora, base_model_name_or_path=base)
    back = interop.load_peft(tmp_path, params, layouts)
    flat, flat_back = rules.flatten(adapters), rules.flatten(back)
    assert sorted(flat) == sorted(flat_back)
    for path, a in flat.items():
        b = flat_back[path]
        assert (b.rank, b.layout, b.method) == (a.rank, a.layout, a.method), path
        assert b.scale == pytest.approx(a.scale, rel=1e-12), path
        for k in a.params:
            np.testing.assert_array_equal(_np(a.params[k]), _np(b.params[k]), err_msg=path)
    want = _np(model.apply({"params": lj.merge(params, adapters)}, TOKENS))
    got = _np(model.apply({"params": lj.merge(params, back)}, TOKENS))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want - _np(model.apply({"params": params}, TOKENS))).max() > 0.1

    # The config says what PEFT would inject: exactly the file's modules, with the file's ranks.
    config = json.load(open(tmp_path / "adapter_config.json"))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    modules = {re.sub(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_[AB]|"
                      r"lora_magnitude_vector)$", "", k)[len(interop.PREFIX):] for k in tensors}
    all_modules = _all_modules(base, params)
    tied = {"lm_head"} if config["ensure_weight_tying"] else set()
    assert {m for m in all_modules if _peft_selects(config, m)} | tied == modules
    for m in modules - tied:
        a = tensors.get(f"{interop.PREFIX}{m}.lora_A.weight",
                        tensors.get(f"{interop.PREFIX}{m}.lora_embedding_A"))
        assert interop._pattern_value(config["rank_pattern"], m, config["r"]) == a.shape[0], m
    assert config["fan_in_fan_out"] == base.startswith("gpt2")
    assert config["use_rslora"] == rslora and config["use_dora"] == (kw.get("method") == "dora")


def _all_modules(base, params):
    family = interop.family_of(params)
    n = 2
    names = [t.format(i) for t in interop._module_templates(family) for i in range(n)]
    return sorted(set(names))


def test_partial_layers_are_listed_by_full_name(tmp_path):
    _, params, layouts = _load("gpt2_base")
    spec = lj.LoraSpec(targets=(r"h_1/mlp/c_fc/kernel",), rank=2)
    interop.save_peft(tmp_path, params, _perturbed(params, spec, layouts, 3))
    assert json.load(open(tmp_path / "adapter_config.json"))["target_modules"] == [
        "transformer.h.1.mlp.c_fc"]


# ----------------------------------------------------------------------------- save_hf


@pytest.mark.parametrize("base,scan", [("gpt2_base", True), ("llama_base", False),
                                       ("llama_tied_base", True)])
def test_save_hf_round_trip(tmp_path, base, scan):
    model, params, layouts = _load(base, scan)
    adapters = _perturbed(params, lj.LoraSpec(rank=2, targets=("attn",)), layouts, 7)
    merged = lj.merge(params, adapters)
    want = _np(model.apply({"params": merged}, TOKENS))
    assert interop.save_hf(tmp_path / "f32", merged, model.cfg) == ["model.safetensors"]
    model2, params2 = load_hf_checkpoint(str(tmp_path / "f32"), scan_layers=scan)
    assert model2.cfg == model.cfg
    np.testing.assert_allclose(_np(model2.apply({"params": params2}, TOKENS)), want, atol=1e-5)
    # HF's own names and shapes, as save_pretrained writes them (tied heads left out).
    hf_names = set(load_file(os.path.join(PEFT, base, "model.safetensors")))
    assert set(load_file(str(tmp_path / "f32" / "model.safetensors"))) == hf_names

    files = interop.save_hf(tmp_path / "bf16", merged, model.cfg, dtype="bfloat16",
                            max_shard_bytes=20_000)
    assert len(files) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}.safetensors", f)
                                  for f in files)
    index = json.load(open(tmp_path / "bf16" / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == hf_names and set(index["weight_map"].values()) == set(files)
    assert {str(x.dtype) for f in files
            for x in load_file(str(tmp_path / "bf16" / f)).values()} == {"bfloat16"}
    model3, params3 = load_hf_checkpoint(str(tmp_path / "bf16"), scan_layers=scan)
    rounded = jax.tree.map(lambda x: x.astype("bfloat16").astype("float32"), merged)
    np.testing.assert_allclose(_np(model3.apply({"params": params3}, TOKENS)),
                               _np(model.apply({"params": rounded}, TOKENS)), atol=1e-5)


# ----------------------------------------------------------------------------- HF configs


@pytest.mark.parametrize("major", ["tf4", "tf5"])
def test_configs_as_transformers_writes_them(major):
    read = lambda name: config_from_hf(json.load(open(os.path.join(CONFIGS, f"{major}_{name}.json"))))
    theta = read("llama_theta")
    assert (theta.rope_theta, theta.rope_llama3, theta.tie_embeddings) == (500000.0, None, False)
    assert theta.rms_norm_eps == 1e-5 and theta.n_kv_heads == 2
    llama31 = read("llama31")
    assert (llama31.rope_theta, llama31.rope_llama3) == (500000.0, (8.0, 1.0, 4.0, 64))
    assert read("llama_tied").tie_embeddings
    assert read("gpt2").d_model == 32
    with pytest.raises(ValueError, match=r"rope_type 'linear'.*'default'.*'llama3'"):
        read("llama_linear")
    # What we write reads back to the same config.
    assert config_from_hf(config_to_hf(llama31)) == llama31


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral"}, r"unknown model_type 'mistral'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"LlamaForSequenceClassification"),
    ({"attention_bias": True}, r"attention_bias=true"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"head_dim": 16}, r"head_dim=16"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"'yarn'"),
])
def test_config_refusals_name_the_field(change, match):
    cfg = json.load(open(os.path.join(CONFIGS, "tf5_llama_theta.json")))
    with pytest.raises(ValueError, match=match):
        config_from_hf({**cfg, **change})


# ----------------------------------------------------------------------------- peft_targets


@pytest.mark.parametrize("scan", [False, True])
def test_peft_targets_select_what_peft_selects(scan):
    _, params, _ = _load("llama_base", scan)
    mine = rules.select_targets(params, lj.peft_targets(["q_proj", "v_proj"], family="llama"),
                                rank=4, alpha=8.0)
    preset = rules.select_targets(params, ("qv",), rank=4, alpha=8.0)
    assert [t.path for t in mine] == [t.path for t in preset]
    regex = lj.peft_targets(r".*\.mlp\.(up|down)_proj", family="llama")
    paths = [t.path for t in rules.select_targets(params, regex, rank=4, alpha=8.0)]
    assert paths and all(re.search(r"mlp/(up|down)_proj", p) for p in paths)
    assert len(paths) == (2 if scan else 4)
    one_layer = lj.peft_targets(r"model\.layers\.1\.self_attn\.(q|k)_proj", family="llama")
    if not scan:
        assert [t.path for t in rules.select_targets(params, one_layer, rank=4, alpha=8.0)] == [
            "layers_1/self_attn/k_proj/kernel", "layers_1/self_attn/q_proj/kernel"]
    _, gparams, _ = _load("gpt2_base")
    fused = rules.select_targets(gparams, lj.peft_targets(["c_attn", "wte"], family="gpt2"),
                                 rank=4, alpha=8.0)
    assert [t.path for t in fused] == ["h_0/attn/c_attn/kernel", "h_1/attn/c_attn/kernel",
                                       "wte/embedding"]
    with pytest.raises(ValueError, match=r"'q_proj' matches no gpt2 module"):
        lj.peft_targets(["q_proj"], family="gpt2")


def test_pissa_adapter_is_refused_for_peft(tmp_path):
    _, params, layouts = _load("llama_base")
    spec = lj.LoraSpec(rank=2, method=lj.methods.lora(init_weights="pissa"))
    adapters = lj.init_adapters(params, spec, jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match=r"PiSSA.*save_hf"):
        interop.save_peft(tmp_path, params, adapters)
