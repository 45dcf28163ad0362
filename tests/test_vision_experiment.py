"""experiments/vision.py end to end on the tiny ViT: the cached base, every method, the table."""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from experiments import vision


@pytest.mark.slow  # ~30 s of CPU: five compiles (pretraining and four methods)
def test_vision_experiment_runs_every_method_and_caches_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path))
    cfg = vision.VisionConfig(preset="tiny", pretrain_steps=3, adapt_steps=2, batch_size=16,
                              seeds=(0, 1), held_out=("rot90_0to4",))
    rows = vision.run(cfg)
    assert [r["method"] for r in rows] == list(vision.METHODS)
    cached = list((tmp_path / "vision").glob("vit-*.msgpack"))
    assert len(cached) == 1
    model, mcfg = vision.get_model("vit", "tiny")
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 8, 8, 1)))["params"])
    n_base = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    by = {r["method"]: r for r in rows}
    head = mcfg.d_model * 10 + 10
    assert by["full"]["trainable"] == n_base
    assert by["linear_probe"]["trainable"] == head
    d, f, r = mcfg.d_model, mcfg.d_ff, cfg.rank  # all-linear: q, k, v, o, up, down per block
    lora = mcfg.n_layers * (4 * r * (d + d) + r * (d + f) + r * (f + d)) + head
    assert by["lora"]["trainable"] == lora
    assert by["dora"]["trainable"] == lora + mcfg.n_layers * (4 * d + f + d)  # magnitudes
    for row in rows:
        assert len(row["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in row["accs"])
    # A second run reads the cached base instead of pretraining again.
    mtime = cached[0].stat().st_mtime_ns
    vision.pretrained_base(cfg, model)
    assert cached[0].stat().st_mtime_ns == mtime
    table = vision.table(rows, n_base)
    assert "| rot90_0to4 | lora |" in table and "| **mean** | linear_probe |" in table


def test_dual_encoder_rules_give_one_adapter_set_per_tower():
    from experiments import vision_clip as vc

    cfg = vc.vit_config("tiny", num_classes=0)
    model = vc.DualEncoder(cfg, vc.TextTower(vc.ViTConfig(d_model=16, n_layers=1, n_heads=2,
                                                          d_ff=32, num_classes=0)), embed_dim=8)
    example = (jnp.zeros((2, 8, 8, 1)), jnp.asarray(vc.tokenize(["a photo of the digit one",
                                                                 "two"])))
    params = nn.meta.unbox(model.init(jax.random.key(0), *example)["params"])
    layouts = vc.lj.trace_layouts(model, params, *example)
    spec = vc.lj.LoraSpec(targets=(vc.lj.Rule(r"image/.*self_attn/(q|v)_proj/kernel", rank=4),
                                   vc.lj.Rule(r"text/.*self_attn/(q|v)_proj/kernel", rank=2)),
                          modules_to_save=(r"(image|text)_proj/kernel",))
    adapters = vc.lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    assert sorted(adapters) == ["image", "image_proj", "text", "text_proj"]
    is_adapter = lambda x: isinstance(x, vc.lj.Adapter)
    assert {a.rank for a in jax.tree.leaves(adapters["image"], is_leaf=is_adapter)} == {4}
    assert {a.rank for a in jax.tree.leaves(adapters["text"], is_leaf=is_adapter)} == {2}
    img, txt = vc.lj.apply(model, params, adapters, *example)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
    # InfoNCE is near 0 for matching unit vectors and log(n) for identical rows.
    eye = jnp.eye(4)[None]
    assert float(vc.info_nce(eye, eye, temperature=0.01)) < 1e-3
    same = jnp.ones((1, 4, 4)) / 2.0
    np.testing.assert_allclose(float(vc.info_nce(same, same)), np.log(4), rtol=1e-5)


def test_minilm_text_side_loads_a_bert_checkpoint_and_aligns_one_step(tmp_path, monkeypatch):
    """The MiniLM path on a tiny BERT folder the test writes (config, safetensors, WordPiece
    tokenizer.json, sentence-transformers mean pooling): captions become [CLS] ... [SEP], the
    loaded weights sit under `text`, the q/v rule selects BERT's kernels, one step trains."""
    import json

    import optax
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from experiments import vision_clip as vc
    from tests.models.test_bert import HF, hf_weights

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted({w for c in vc.all_captions()
                                                           for w in c.split()})]
    hf = {**HF, "vocab_size": len(words)}
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    weights = hf_weights(hf)
    save_file(weights, str(tmp_path / "model.safetensors"))

    with pytest.raises(ValueError, match="text='clip'"):
        vc.text_side("clip", vc.ClipConfig.byte_tower)
    assert isinstance(vc.text_side("bytes", vc.ClipConfig.byte_tower).module, vc.TextTower)
    monkeypatch.setenv("LORA_JAX_MINILM_DIR", str(tmp_path))  # what `auto` looks at first
    assert vc.minilm_dir() == str(tmp_path)
    text = vc.text_side("auto", vc.ClipConfig.byte_tower)
    assert text.name.startswith("all-MiniLM-L6-v2")
    assert text.module.cfg.pooling == "mean" and text.module.cfg.d_model == hf["hidden_size"]
    ids = text.tokenize(["a photo of the digit seven", "one"])
    assert ids.shape == (2, 8)  # the longest caption (6 words) + [CLS] and [SEP]
    assert list(ids[1]) == [2, words.index("one"), 3, 0, 0, 0, 0, 0]

    model = vc.DualEncoder(vc.vit_config("tiny", num_classes=0), text.module, embed_dim=8)
    rng = np.random.default_rng(0)
    images, tokens = vc.class_groups({"images": rng.random((10, 8, 8, 1), np.float32),
                                      "labels": np.arange(10)}, rng, 1, text.tokenize)
    example = (jnp.asarray(images[0]), jnp.asarray(tokens[0]))
    params = nn.meta.unbox(model.init(jax.random.key(0), *example)["params"])
    params["text"] = text.params
    np.testing.assert_array_equal(params["text"]["word_embeddings"]["embedding"],
                                  weights["embeddings.word_embeddings.weight"])
    spec = vc.lj.LoraSpec(targets=(vc.lj.Rule(r"text/.*self_attn/(q|v)_proj/kernel", rank=2),),
                          modules_to_save=(r"text_proj/kernel",))
    adapters = vc.lj.init_adapters(params, spec, jax.random.key(1),
                                   layouts=vc.lj.trace_layouts(model, params, *example))
    assert sorted(adapters["text"]) == ["layers_0", "layers_1"]
    trainable, state = vc.lj.split(adapters)
    loss = lambda t: vc.info_nce(*(z[None] for z in vc.lj.apply(
        model, params, vc.lj.join(t, state), *example)))
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(trainable), trainable)
    assert float(loss(optax.apply_updates(trainable, updates))) < float(value)
