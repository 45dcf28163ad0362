"""LoSA: sparse adapters (exact sparsity pattern after merge, factored == merged, remat), the
schedule (one iteration, rank masks), no recompilation when masks/ranks change, and the whole
trainer end to end on a tiny model, including resume."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import models, rules
from lora_jax.sparsity import model as sm
from lora_jax.sparsity import schedule as sch
from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer
from tests.train.test_trainer import load_config, tiny


def _setup(rank=4, scale_b=0.05):
    model, _ = models.get_model("gpt2", "tiny", d_model=32, n_layers=3, n_head=2, vocab_size=64,
                                n_positions=32)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    params = lj.transform._unbox(model.init(jax.random.key(1), tokens)["params"])
    params, _ = sm.prune_model(model, params, tokens, 0.5, "wanda")
    layouts = lj.trace_layouts(model, params, tokens[:1])
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("all-linear",), method="losa")
    adapters = lj.init_adapters(params, spec, jax.random.key(2), layouts=layouts)
    # Non-zero B so the adapters do something.
    adapters = jax.tree.map(
        lambda a: dataclasses.replace(a, params={**a.params, "b": scale_b * jax.random.normal(
            jax.random.key(3), a.params["b"].shape)}), adapters, is_leaf=lj.methods.is_adapter)
    return model, params, adapters, tokens, layouts


def test_merged_kernels_keep_the_base_sparsity_pattern_exactly():
    model, params, adapters, tokens, _ = _setup()
    merged, base = rules.flatten(lj.merge(params, adapters)), rules.flatten(params)
    for path in rules.flatten(adapters):
        np.testing.assert_array_equal(merged[path] != 0, base[path] != 0)
        assert not np.array_equal(merged[path], base[path])  # the adapter did change the weights
    assert sch.merged_sparsity(params, adapters) == pytest.approx(0.5, abs=1e-6)


def test_factored_equals_merged_and_unmerge_inverts():
    model, params, adapters, tokens, _ = _setup()
    y = lj.apply(model, params, adapters, tokens)
    np.testing.assert_allclose(y, model.apply({"params": lj.merge(params, adapters)}, tokens),
                               atol=1e-5)
    back = lj.unmerge(lj.merge(params, adapters), adapters)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_rank_mask_selects_leading_ranks():
    model, params, adapters, tokens, _ = _setup(rank=4)
    trimmed = jax.tree.map(
        lambda a: dataclasses.replace(a, state={**a.state, "rank_mask": jnp.array([1., 1., 0, 0])},
                                      params={"a": a.params["a"][..., :4],
                                              "b": a.params["b"].at[2:].set(7.0)}),
        adapters, is_leaf=lj.methods.is_adapter)
    ref = jax.tree.map(lambda a: dataclasses.replace(a, params={**a.params, "b": a.params["b"].at[
        2:].set(0.0)}), adapters, is_leaf=lj.methods.is_adapter)
    np.testing.assert_allclose(lj.apply(model, params, trimmed, tokens),
                               lj.apply(model, params, ref, tokens), atol=1e-5)


def test_dropout_path_and_remat_give_the_same_gradients():
    model, params, adapters, tokens, _ = _setup()
    tr, st = lj.split(adapters)

    def loss(t, st, train):
        y = lj.apply(model, params, lj.join(t, st), tokens, train=train,
                     rngs={"dropout": jax.random.key(0)})
        return jnp.mean(y ** 2)

    plain = lambda a: dataclasses.replace(a, method=dataclasses.replace(a.method, remat=False))
    no_remat = jax.tree.map(plain, st, is_leaf=lj.methods.is_adapter)
    tr_nr = jax.tree.map(plain, tr, is_leaf=lj.methods.is_adapter)
    g1 = jax.grad(loss)(tr, st, False)
    g2 = jax.grad(loss)(tr_nr, no_remat, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Masked-out entries get no gradient through A B: a fully masked kernel has zero grads.
    zero = jax.tree.map(lambda a: dataclasses.replace(
        a, state={**a.state, "mask": jnp.zeros_like(a.state["mask"])}), st,
        is_leaf=lj.methods.is_adapter)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(jax.grad(loss)(
        tr, zero, False)))


def test_iteration_prunes_merged_weights_and_unmerges_with_the_new_mask():
    model, params, adapters, tokens, layouts = _setup(rank=8)
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    dense = sm.run_blocks(blocks, params, x0)[1:]
    opts = sch.LosaOptions(target=0.7, iterations=2, rank_start=4, rank_step=2)
    new_params, new_adapters, info = sch.losa_iteration(params, adapters, x0, blocks, layouts,
                                                        dense, 2, opts)
    assert info["target"] == pytest.approx(0.7) and len(info["errors"]) == 3
    assert np.mean(info["layer_sparsity"]) == pytest.approx(0.7)
    assert sum(info["ranks"]) == 6 * 3 and info["mean_rank"] == 6
    old, new = rules.flatten(params), rules.flatten(new_params)
    flat = rules.flatten(new_adapters)
    for path, a in flat.items():
        keep = a.state["mask"]
        # Wanda keeps merged entries as they are, so unmerging gives back the base entries.
        np.testing.assert_allclose(jnp.where(keep, new[path], 0), jnp.where(keep, old[path], 0),
                                   atol=1e-6)
        assert bool(jnp.all(jnp.where(keep, True, new[path] == 0)))
        rank = info["ranks"][blocks.index(path)]
        np.testing.assert_array_equal(a.state["rank_mask"], np.arange(8) < rank)
    assert sch.merged_sparsity(new_params, new_adapters) == pytest.approx(
        float(np.mean(info["layer_sparsity"])), abs=0.02)


def test_changing_masks_and_ranks_does_not_recompile_the_step():
    model, params, adapters, tokens, layouts = _setup(rank=8)
    trainable, state = lj.split(adapters)
    tx = lj.adapter_optimizer(optax.adam(1e-3), trainable)
    opt = tx.init(trainable)

    @jax.jit
    def step(trainable, opt, frozen):
        def loss(t):
            return jnp.mean(lj.apply(model, frozen["params"], lj.join(t, frozen["state"]),
                                     tokens) ** 2)
        l, g = jax.value_and_grad(loss)(trainable)
        u, opt = tx.update(g, opt, trainable)
        return optax.apply_updates(trainable, u), opt, l

    frozen = {"params": params, "state": state}
    trainable, opt, _ = step(trainable, opt, frozen)
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    dense = sm.run_blocks(blocks, params, x0)[1:]
    for t in (1, 2):
        p, a, info = sch.losa_iteration(frozen["params"], lj.join(trainable, frozen["state"]),
                                        x0, blocks, layouts, dense, t,
                                        sch.LosaOptions(target=0.7, iterations=2))
        frozen = {"params": p, "state": lj.split(a)[1]}
        trainable, opt, _ = step(trainable, opt, frozen)
    assert len(set(info["ranks"])) > 1  # ranks did change between calls
    assert step._cache_size() == 1


def _losa_tiny(steps=10, **sparsity):
    cfg = tiny(from_dict(Experiment, load_config("losa").to_dict()), steps=steps)
    return dataclasses.replace(cfg, method_args={**cfg.method_args, **sparsity})


def test_schedule_end_to_end(tmp_path):
    cfg = _losa_tiny(steps=6, iterations=3, target=0.5)
    summary = train_and_evaluate(cfg, tmp_path)
    assert [r["iteration"] for r in summary["losa"]] == [1, 2, 3]
    assert [r["mean_rank"] for r in summary["losa"]] == [6, 7, 8]
    assert summary["sparsity"] == summary["base_sparsity"]
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.03)  # d_in = 32: per-column rounding
    merged = lj.io.load_params(tmp_path / "merged")
    adapters, _ = lj.io.load_adapters(tmp_path / "adapter")
    flat = rules.flatten(merged)
    for path, a in rules.flatten(adapters).items():
        np.testing.assert_array_equal(flat[path] != 0, a.state["mask"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["sparsity"] == summary["sparsity"]


def test_fewer_steps_than_iterations_still_reach_the_target(tmp_path):
    summary = train_and_evaluate(_losa_tiny(steps=1, iterations=3, target=0.5), tmp_path)
    assert len(summary["losa"]) == 3 and summary["losa"][-1]["target"] == pytest.approx(0.5)


def _losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_resumed_losa_run_reproduces_losses(tmp_path, monkeypatch):
    cfg = _losa_tiny(steps=6, iterations=3)
    train_and_evaluate(cfg, tmp_path / "straight")
    write = trainer.MetricsWriter.write

    def write_then_term(self, step, split, **values):
        write(self, step, split, **values)
        if split == "train" and step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.MetricsWriter, "write", write_then_term)
    assert train_and_evaluate(cfg, tmp_path / "resumed")["interrupted"]
    monkeypatch.setattr(trainer.MetricsWriter, "write", write)
    summary = train_and_evaluate(cfg, tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert len(summary["losa"]) == 3


def test_reference_options_cap_ranks_and_freeze_earlier_zeros():
    """variant=reference: ranks capped at rank_cap (the reference slices lora_A[:rank] of r = 8
    adapters), and masks from W != 0, so entries that were zero stay frozen."""
    model, params, adapters, tokens, layouts = _setup(rank=8)
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    dense = sm.run_blocks(blocks, params, x0)[1:]
    opts = sch.LosaOptions(target=0.7, iterations=2, rank_start=6, rank_step=4, rank_cap=5,
                           mask_from="nonzero")
    new_params, new_adapters, info = sch.losa_iteration(params, adapters, x0, blocks, layouts,
                                                        dense, 2, opts)
    assert max(info["ranks"]) == 5 and info["mean_rank"] == 8
    old = rules.flatten(params)
    for path, a in rules.flatten(new_adapters).items():
        assert int(jnp.sum(a.state["rank_mask"])) <= 5
        assert not bool(jnp.any(a.state["mask"] & (old[path] == 0)))  # earlier zeros frozen


def test_beta_does_not_change_the_exact_lp_allocation():
    importance = np.array([0.3, 0.9, 0.5, 0.7])
    from lora_jax.sparsity import losa

    rates = [losa.allocate_sparsity(np.exp(-b * importance), 0.6, 0.05) for b in (0.5, 1, 100)]
    for r in rates[1:]:
        np.testing.assert_allclose(r, rates[0], atol=1e-9)


def test_bf16_base_keeps_a_tiny_delta():
    """W + s·Δ rounded to bf16 loses a delta far below |W|'s rounding step; the sparse method
    keeps the base and delta products apart, so the delta still changes the output."""
    kernel = jnp.full((16, 8), 4.0, jnp.bfloat16)
    layout = lj.layers.dense_layout((16, 8), 1)
    method = lj.methods.losa()
    a = method.init(jax.random.key(0), kernel, layout, 2, 1.0, 0.0)
    signs = jnp.where(jnp.arange(16) % 2 == 0, 1.0, -1.0)
    x = jnp.broadcast_to(signs, (3, 16)).astype(jnp.bfloat16)  # x·W = 0 exactly
    a = dataclasses.replace(a, params={"a": 1e-3 * jnp.stack([signs, signs], -1),
                                       "b": jnp.full((2, 8), 1e-2)})  # x·s·A B = 3.2e-4
    y = x @ kernel
    out = method.output(y, x, a, kernel, None, None, lj.Ctx())
    np.testing.assert_allclose(out.astype(jnp.float32), 3.2e-4, rtol=1e-2)
    w_plus = (kernel.astype(jnp.float32) + 2e-5).astype(jnp.bfloat16)  # what one matmul would see
    assert bool(jnp.all(w_plus == kernel))


def test_calibration_gives_the_model_the_data_kinds_inputs(tmp_path):
    """Packed rows (the jsonl / text kinds) are calibrated with their segment_ids: the hook's
    dense block outputs are those of the block-diagonal model, not of examples mixed in a row."""
    model, params, adapters, tokens, _ = _setup()
    seg = jnp.broadcast_to(jnp.where(jnp.arange(16) < 7, 1, 2), tokens.shape)
    _, state = lj.transform.split(adapters)
    run = lj.methods.Run(model=model, train_arrays={"inputs": tokens, "segment_ids": seg},
                         tasks=("all",), steps=2, seed=0, workdir=tmp_path,
                         inputs=("inputs", "segment_ids"))
    hook = sch.trainer_hook(lj.methods.LoSA(iterations=1, calib_samples=8), run)  # every row
    hook.restore(0, {"params": params, "state": state})

    def outputs(*inputs):
        blocks, x0 = sm.capture_blocks(model, params, *inputs)
        return sm.run_blocks(blocks, params, x0)[-1]

    np.testing.assert_allclose(hook.hook.dense_outputs[-1], outputs(tokens, seg), atol=1e-5)
    assert not np.allclose(hook.hook.dense_outputs[-1], outputs(tokens), atol=1e-3)


def test_claim_sweep_fine_tunes_and_evaluates_on_the_pretraining_tasks():
    """configs/losa.py:claim (docs/losa.md): every point builds, trains and is scored on the
    tasks the base was pretrained on, for the same steps, over one base; each configuration has
    >= 3 adapter seeds; the columns are LoSA and prune once + LoRA per pruner and S, and LoRA on
    the unpruned base."""
    from configs import common
    from configs import losa as losa_config

    base = losa_config.get_config("claim")
    points = losa_config.get_sweep("claim")
    cfgs = [from_dict(Experiment, common.apply_overrides(base, p).to_dict()) for p in points]
    by_config = {}
    for p, cfg in zip(points, cfgs):
        assert cfg.data.tasks == cfg.base.pretrain_tasks and cfg.base.source == "pretrain"
        assert cfg.train.steps == cfgs[0].train.steps and cfg.base == cfgs[0].base
        lj.methods.from_config(cfg.method, cfg.method_args)  # the method accepts its arguments
        by_config.setdefault(tuple(sorted((k, v) for k, v in p.items() if k != "seed")),
                             set()).add(cfg.seed)
    assert all(len(seeds) >= 3 for seeds in by_config.values())
    kinds = {(dict(k)["method_args.target"], dict(k).get("method_args.pruner", "wanda"),
              dict(k).get("method_args.iterations", 5), dict(k).get("method_args.masked", True))
             for k in by_config}
    assert kinds == {(0.0, "wanda", 1, False)} | {
        (s, p, t, m) for s in (0.5, 0.7) for p in ("wanda", "sparsegpt")
        for t, m in ((5, True), (1, False))}
