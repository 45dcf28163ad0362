"""Model-level pruning: block capture, exact per-kernel sparsity for every pruner and 2:4, and the
sequential order (block i is pruned from the inputs the already-pruned blocks give it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import lora_jax as lj
from lora_jax import models, rules
from lora_jax.sparsity import model as sm
from lora_jax.sparsity import pruners


def _tiny(family):
    kw = dict(d_model=32, n_layers=3, vocab_size=64)
    kw.update(n_head=2, n_positions=32) if family == "gpt2" else kw.update(
        n_heads=2, n_kv_heads=1, max_seq_len=32)
    model, _ = models.get_model(family, "tiny", **kw)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    params = lj.transform._unbox(model.init(jax.random.key(1), tokens)["params"])
    return model, params, tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_blocks_reproduce_the_model(family):
    model, params, tokens = _tiny(family)
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    assert len(blocks.names) == 3 and x0.shape == (8, 16, 32)
    xs = sm.run_blocks(blocks, params, x0, batch_size=3)

    captured = {}

    def catch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path == (blocks.names[-1],):
            captured["y"] = out[0]
        return out

    with nn.intercept_methods(catch):
        model.apply({"params": params}, tokens)
    np.testing.assert_allclose(xs[-1], captured["y"], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_every_kernel_gets_its_sparsity(family, pruner):
    model, params, tokens = _tiny(family)
    pruned, masks = sm.prune_model(model, params, tokens, 0.5, pruner)
    flat, before = rules.flatten(pruned), rules.flatten(params)
    assert masks and set(masks) == {t.path for t in lj.select_targets(
        params, ("all-linear",), rank=1, alpha=1.0)}
    for path, keep in masks.items():
        assert keep.shape == flat[path].shape
        assert float(jnp.mean(~keep)) == pytest.approx(0.5, abs=1e-6), path
        assert bool(jnp.all(jnp.where(keep, True, flat[path] == 0)))
        if pruner != "sparsegpt":  # only SparseGPT updates the kept weights
            np.testing.assert_array_equal(jnp.where(keep, before[path], 0), flat[path])
    assert sm.measured_sparsity(pruned, list(masks)) == pytest.approx(0.5, abs=1e-6)


def test_two_four_pattern():
    model, params, tokens = _tiny("gpt2")
    pruned, masks = sm.prune_model(model, params, tokens, None, "wanda", pattern=(2, 4))
    layouts = lj.trace_layouts(model, params, tokens[:1])
    for path, keep in masks.items():
        k2 = sm._as_2d(layouts[path], keep)
        groups = k2.reshape(k2.shape[0] // 4, 4, k2.shape[1]).sum(axis=1)
        assert bool(jnp.all(groups == 2)), path


def test_pruning_is_sequential():
    """Block 1's Wanda mask comes from the inputs of the *pruned* block 0."""
    model, params, tokens = _tiny("gpt2")
    pruned, masks = sm.prune_model(model, params, tokens, 0.5, "wanda")
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    flat = rules.flatten(pruned)
    x1 = sm.run_blocks(blocks, {"h_0": sm.params_of(flat, "h_0")} | {
        n: params[n] for n in blocks.names[1:]}, x0)[1]
    _, inputs = sm._block_fn(blocks.module)(params["h_1"], x1)
    path = "h_1/mlp/c_fc/kernel"
    x = inputs["mlp/c_fc/kernel"].reshape(-1, 32)
    _, expect = pruners.wanda_prune(params["h_1"]["mlp"]["c_fc"]["kernel"],
                                    pruners.calib_stats_from_inputs(x).col_norm_sq, 0.5)
    np.testing.assert_array_equal(masks[path], expect)


def test_scanned_stack_is_refused_with_a_fix():
    model, _ = models.get_model("gpt2", "tiny", d_model=32, n_layers=2, n_head=2, vocab_size=64,
                                n_positions=32, scan_layers=True)
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = lj.transform._unbox(model.init(jax.random.key(0), tokens)["params"])
    with pytest.raises(ValueError, match="scan_layers=False"):
        sm.capture_blocks(model, params, tokens)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_calibration_rows_keep_examples_apart(family):
    """Rows of two packed examples (``segment_ids``, the data kind's second model input): every
    block sees each example as if it were alone in its row, and the pruners' statistics equal
    those of the examples unpacked, so the masks do too."""
    model, params, tokens = _tiny(family)  # (8, 16): two examples of 8 tokens per row
    seg = jnp.broadcast_to(jnp.where(jnp.arange(16) < 8, 1, 2), tokens.shape)
    blocks, x0 = sm.capture_blocks(model, params, tokens, seg)
    apart = jnp.concatenate([tokens[:, :8], tokens[:, 8:]])  # (16, 8)
    blocks_apart, x0_apart = sm.capture_blocks(model, params, apart)
    packed = sm.run_blocks(blocks, params, x0, batch_size=3)  # batches slice the side inputs too
    alone = sm.run_blocks(blocks_apart, params, x0_apart, batch_size=3)
    for p, a in zip(packed, alone):
        np.testing.assert_allclose(jnp.concatenate([p[:, :8], p[:, 8:]]), a, atol=1e-4)
    blocks_mixed, x0_mixed = sm.capture_blocks(model, params, tokens)
    mixed = sm.run_blocks(blocks_mixed, params, x0_mixed)[-1]
    assert not np.allclose(mixed[:, 8:], alone[-1][8:], atol=1e-3)  # without segment_ids

    layouts = lj.trace_layouts(model, params, tokens[:1])
    paths = [t.path for t in lj.select_targets(params, ("all-linear",), rank=1, alpha=1.0)]
    _, masks, _ = sm.prune_blocks(blocks, params, x0, paths, layouts, [0.5] * 3, "wanda")
    _, masks_apart, _ = sm.prune_blocks(blocks_apart, params, x0_apart, paths, layouts,
                                        [0.5] * 3, "wanda")
    for p in paths:
        np.testing.assert_array_equal(masks[p], masks_apart[p])
