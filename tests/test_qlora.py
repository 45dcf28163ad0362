"""QLoRA: quantised frozen bases under lj.apply, adapters over them, honest merges, bytes, trainer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import layers, models, quant


def _model(family="gpt2", **overrides):
    model, _ = models.get_model(family, "tiny", n_layers=2, **overrides)
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 512)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)["params"]))(jax.random.key(1))
    return model, params, x


@jax.jit
def _perturb(adapters, scale=0.05):
    """Adapters with non-zero B (and A), so they change the output."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [v + scale * jax.random.normal(k, v.shape)
                                     for k, v in zip(keys, leaves)])


def _forward(model, x):
    """Jitted ``lj.apply(model, params, adapters, x)`` (op-by-op it compiles every op)."""
    return jax.jit(lambda params, adapters: lj.apply(model, params, adapters, x))


@pytest.mark.parametrize("family,kind,scan,dtype", [
    ("gpt2", "nf4", False, "float32"),
    ("gpt2", "nf4", True, "float32"),
    ("gpt2", "int8", True, "bfloat16"),
    ("llama", "nf4", False, "bfloat16"),
    ("llama", "int8", False, "float32"),
])
def test_quantized_forward_equals_dequantized_copy(family, kind, scan, dtype):
    model, params, x = _model(family, scan_layers=scan, dtype=jnp.dtype(dtype))
    qparams = lj.quantize_params(params, "all-linear", kind,
                                 layouts=lj.trace_layouts(model, params, x))
    flat = lj.rules.flatten(qparams)
    n_linear = len(lj.select_targets(params, ("all-linear",), rank=1, alpha=1.0))
    assert sum(quant.is_quantized(v) for v in flat.values()) == n_linear
    assert not any(quant.is_quantized(v) for p, v in flat.items() if "wte" in p or "lm_head" in p)
    dense, fwd = lj.dequantize_params(qparams), _forward(model, x)
    np.testing.assert_array_equal(fwd(qparams, {}), fwd(dense, {}))
    # trace_layouts works on the quantised tree; adapters over it match the dense copy exactly.
    layouts = lj.trace_layouts(model, qparams, x)
    assert layouts == lj.trace_layouts(model, params, x)
    adapters = _perturb(lj.init_adapters(qparams, lj.LoraSpec(rank=4, targets=("all-linear",)),
                                         jax.random.key(2), layouts=layouts))
    np.testing.assert_array_equal(fwd(qparams, adapters), fwd(dense, adapters))


def test_nf4_base_stays_close_to_the_fp32_base():
    model, params, x = _model()
    qparams = lj.quantize_params(params, "all-linear", "nf4",
                                 layouts=lj.trace_layouts(model, params, x))
    dense, flat = lj.rules.flatten(lj.dequantize_params(qparams)), lj.rules.flatten(params)
    for path, q in lj.rules.flatten(qparams).items():
        if quant.is_quantized(q):  # NF4: ~9% RMS error on normal weights
            err = jnp.sqrt(jnp.mean((dense[path] - flat[path]) ** 2) / jnp.mean(flat[path] ** 2))
            assert float(err) < 0.1, path
        else:
            assert dense[path] is flat[path]
    fwd = _forward(model, x)
    ref, got = fwd(params, {}), fwd(qparams, {})
    assert np.corrcoef(np.ravel(ref), np.ravel(got))[0, 1] > 0.95


def test_gradients_reach_only_adapters():
    model, params, x = _model(scan_layers=True)
    layouts = lj.trace_layouts(model, params, x)
    qparams = lj.quantize_params(params, "all-linear", "nf4", layouts=layouts)
    adapters = lj.init_adapters(qparams, lj.LoraSpec(rank=4, targets=("all-linear",)),
                                jax.random.key(2), layouts=layouts)

    @jax.jit
    def loss_grad(adapters, qparams):
        return jax.grad(lambda a: jnp.mean(lj.apply(model, qparams, a, x) ** 2))(adapters)

    grads = loss_grad(adapters, qparams)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    for path, g in lj.rules.flatten(grads).items():
        assert float(jnp.max(jnp.abs(g.params["b"]))) > 0, path  # B = 0 at init, so dL/dA = 0
    # The integer codes of a quantised kernel cannot carry a gradient; its float fields get none.
    with pytest.raises(TypeError):
        jax.grad(lambda q: jnp.sum(lj.apply(model, q, adapters, x)))(qparams)


def test_dora_over_a_quantized_base_starts_at_the_quantized_base():
    model, params, x = _model()
    layouts = lj.trace_layouts(model, params, x)
    qparams = lj.quantize_params(params, "attn", "nf4", layouts=layouts)
    adapters = lj.init_adapters(qparams, lj.LoraSpec(rank=4, targets=("attn",), method="dora"),
                                jax.random.key(2), layouts=layouts)
    fwd = _forward(model, x)
    np.testing.assert_allclose(fwd(qparams, adapters), fwd(qparams, {}), atol=1e-5)


class _AttnOut(nn.Module):
    """GPT-2's attention output projection alone: (b, s, heads, head_dim) -> (b, s, d_model)."""

    features: int

    @nn.compact
    def __call__(self, h):
        return nn.DenseGeneral(self.features, axis=(-2, -1), name="c_proj")(h)


@pytest.mark.parametrize("shape,in_axis,block", [((4, 32, 128), 1, 32), ((12, 64, 768), 1, 64)])
def test_multi_axis_kernel_blocks_along_a_long_input_axis(shape, in_axis, block):
    model = _AttnOut(shape[-1])
    h = jax.random.normal(jax.random.key(0), (2, 3) + shape[:2])
    params = model.init(jax.random.key(1), h)["params"]
    layouts = lj.trace_layouts(model, params, h)
    assert quant.choose_blocking(layouts["c_proj/kernel"], "nf4") == {"in_axis": in_axis,
                                                                      "block_size": block}
    with pytest.raises(ValueError, match="not a multiple of block_size=64"):
        quant.nf4_quantize(params["c_proj"]["kernel"])  # the first-input-axis default fails
    qparams = lj.quantize_params(params, r"c_proj/kernel", "nf4", layouts=layouts)
    q = qparams["c_proj"]["kernel"]
    assert q.shape == shape and q.codes.ndim == len(shape) and q.block_size == block
    w = params["c_proj"]["kernel"]
    assert float(jnp.max(jnp.abs(quant.dequantize(q) - w))) < 0.2 * float(jnp.max(jnp.abs(w)))
    adapters = _perturb(lj.init_adapters(qparams, lj.LoraSpec(rank=4, targets=(r"c_proj/kernel",)),
                                         jax.random.key(2), layouts=layouts))
    fwd = _forward(model, h)
    np.testing.assert_array_equal(fwd(qparams, adapters), fwd(lj.dequantize_params(qparams), adapters))


def test_choose_blocking_int8_and_einsum_layouts():
    assert quant.choose_blocking(layers.dense_layout((12, 64, 768), 2), "int8") == {
        "in_axis": 0, "n_in": 2}
    # Einsum kernel 'hdk' whose input axis d (96) is not leading and not a multiple of 64.
    lay = layers.einsum_layout("bsd,hdk->bshk", (4, 96, 64))
    assert quant.qlora.input_axes(lay) == (1,)
    assert quant.choose_blocking(lay, "nf4") == {"in_axis": 1, "block_size": 32}
    with pytest.raises(ValueError, match="embedding"):
        quant.choose_blocking(layers.embed_layout((512, 64)), "nf4")


@pytest.mark.parametrize("kind,scan", [("nf4", False), ("nf4", True), ("int8", False)])
def test_merge_report_is_honest(kind, scan):
    model, params, x = _model(scan_layers=scan)
    layouts = lj.trace_layouts(model, params, x)
    qparams = lj.quantize_params(params, "all-linear", kind, layouts=layouts)
    adapters = _perturb(lj.init_adapters(qparams, lj.LoraSpec(rank=4, targets=("qv",)),
                                         jax.random.key(2), layouts=layouts))
    merged, report = lj.merge_quantized(model, qparams, adapters, x)
    # still quantised, same storage layout
    assert jax.tree.structure(merged) == jax.tree.structure(qparams)
    assert report.logits_max_abs > 0 and report.logits_mean_abs > 0
    assert all(e > 0 for e in report.kernel_max_abs.values())
    assert len(report.kernel_max_abs) == (1 if scan else 2)
    diff = jnp.abs(lj.apply(model, merged, {}, x) - lj.apply(model, qparams, adapters, x))
    assert float(jnp.max(diff)) == report.logits_max_abs
    assert float(jnp.mean(diff)) == report.logits_mean_abs
    assert "logits max" in str(report)
    # The exact dense merge has no re-quantisation error.
    exact = lj.merge(lj.dequantize_params(qparams), adapters)
    np.testing.assert_allclose(model.apply({"params": exact}, x),
                               lj.apply(model, qparams, adapters, x), atol=2e-5)
    with pytest.raises(ValueError, match="merge_quantized"):
        lj.merge(qparams, adapters)


def test_requantize_reproduces_the_quantizer_exactly():
    w = jax.random.normal(jax.random.key(0), (3, 12, 64, 96))
    for q in (quant.nf4_quantize(w, n_stack=1, in_axis=1),
              quant.nf4_quantize(w, n_stack=1, double_quant=False, in_axis=1, block_size=32),
              quant.int8_quantize(w, n_stack=1, n_in=2)):
        r = quant.requantize(q, w)
        jax.tree.map(np.testing.assert_array_equal, r, q)
        assert jax.tree.structure(r) == jax.tree.structure(q)


def test_bytes_of_gpt2_small_shaped_linear_layers():
    """NF4 all-linear kernels of a GPT-2-small block: <= 0.14x their fp32 bytes (abstractly)."""
    shapes = {"attn/c_attn/kernel": ((768, 3, 12, 64), 1), "attn/c_proj/kernel": ((12, 64, 768), 2),
              "mlp/c_fc/kernel": ((768, 3072), 1), "mlp/c_proj/kernel": ((3072, 768), 1)}
    fp32 = nf4 = int8 = 0
    for shape, n_in in shapes.values():
        w = jax.ShapeDtypeStruct((12,) + shape, jnp.float32)
        kw = quant.choose_blocking(layers.dense_layout(shape, n_in), "nf4")
        nf4 += quant.nbytes(jax.eval_shape(lambda v: quant.nf4_quantize(v, n_stack=1, **kw), w))
        kw = quant.choose_blocking(layers.dense_layout(shape, n_in), "int8")
        int8 += quant.nbytes(jax.eval_shape(lambda v: quant.int8_quantize(v, n_stack=1, **kw), w))
        fp32 += quant.nbytes(w)
    assert nf4 / fp32 <= 0.14 and int8 / fp32 <= 0.26
    # exact accounting for one 2-D kernel: codes + int8 absmax + f32 second-level scales + mean
    q = quant.nf4_quantize(jnp.ones((768, 3072)))
    assert quant.nbytes(q) == 768 * 3072 // 2 + 12 * 3072 + 12 * 12 * 4 + 4


def test_trainer_quantizes_the_base_and_trains_adapters(tmp_path, capsys):
    from configs import qlora
    from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer

    cfg = from_dict(Experiment, qlora.get_config("steps=3").to_dict())
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, overrides="d_model=32,n_layers=2,n_head=2,"
                                       "n_positions=32,vocab_size=320"),
        base=dataclasses.replace(cfg.base, source="init"),
        data=dataclasses.replace(cfg.data, n_train_per_task=16, n_eval_per_task=8, seq_len=24),
        train=dataclasses.replace(cfg.train, batch_size=8, eval_every=1000, log_every=1,
                                  checkpoint_every=1000, eval_batch_size=16))
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["steps"] == 3 and np.isfinite(summary["final_eval_loss"])
    out = capsys.readouterr().out
    assert "quantised 8 kernels to nf4" in out and "MiB" in out
    with pytest.raises(ValueError, match="method='full'"):
        trainer.quantize_base(dataclasses.replace(cfg, method="full"), None, {}, None)
