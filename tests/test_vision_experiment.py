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
    model = vc.DualEncoder(cfg, vc.ViTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                             num_classes=0), embed_dim=8)
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
