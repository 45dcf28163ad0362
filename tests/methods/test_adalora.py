"""AdaLoRA against PEFT's RankAllocator (fixture made by fixtures/make_adalora_fixture.py, no torch
here): the same budget at each step, the same triplet scores and global importance ordering for
the same params and gradients, the same λ zeroed. Then the optimizer wrapper in a jitted train
step (masks without recompiling), the orthogonality regulariser, and the config."""

import importlib
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.methods.adalora import budget_schedule
from lora_jax.train import make_train_step

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "adalora_peft.json").read_text())


def _peft_method():
    c = FIXTURE["config"]
    return lj.methods.adalora(target_rank=c["target_r"], total_step=c["total_step"],
                              tinit=c["tinit"], tfinal=c["tfinal"], delta_t=c["deltaT"],
                              beta1=c["beta1"], beta2=c["beta2"])


def _ours(arrays, key):
    """PEFT's A (r, in), E (r, 1), B (out, r) -> our a (in, r), e (r,), b (r, out)."""
    get = lambda part: np.array(arrays[part][key], np.float32)
    return {"a": get("A").T, "e": get("E")[:, 0], "b": get("B").T}


def test_budget_at_each_step_is_peft():
    c = FIXTURE["config"]
    n = len(FIXTURE["layers"])
    got = [budget_schedule(s["step"], c["init_r"] * n, c["target_r"] * n, c["tinit"], c["tfinal"],
                           c["total_step"], c["deltaT"])[0] for s in FIXTURE["steps"]]
    assert got == [s["budget"] for s in FIXTURE["steps"]]
    assert len(set(got)) > 2, "the fixture does not exercise the cubic phase"


def test_importance_ordering_and_masks_are_pefts():
    method, c = _peft_method(), FIXTURE["config"]
    adapters = [method.init(jax.random.key(0), jnp.zeros((i, o)),
                            lj.Layout("dense", (i,), (o,), (i, o)), c["init_r"], 1.0, 0.0)
                for i, o in FIXTURE["layers"].values()]
    stats = method.init_stats(adapters)
    allocate = jax.jit(method.allocate)
    masked_steps = 0
    for s in FIXTURE["steps"]:
        per = [{p: s["arrays"][f"{layer}.{p}"] for p in "AEB"} for layer in FIXTURE["layers"]]
        adapters = [lj.with_params({"x": a}, {"x": _ours(d, "value")})["x"]
                    for a, d in zip(adapters, per)]
        grads = [_ours(d, "grad") for d in per]
        stats, drop, scores = allocate(adapters, grads, stats, jnp.int32(s["step"]))
        if "scores" in s:
            want = [np.array(s["scores"][layer]) for layer in FIXTURE["layers"]]
            for got, w in zip(scores, want):
                np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-9)
            order = np.argsort(-np.concatenate([np.asarray(x) for x in scores]), kind="stable")
            assert order.tolist() == s["order"], f"step {s['step']}"
        kept = [(~np.asarray(d)).tolist() for d in drop]
        assert kept == [s["kept"][layer] for layer in FIXTURE["layers"]], f"step {s['step']}"
        masked_steps += not all(all(k) for k in kept)
    assert masked_steps >= 4


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="second")(jnp.tanh(nn.Dense(8, name="first")(x)))


def test_the_jitted_step_reaches_the_target_rank_without_recompiling():
    method = lj.methods.adalora(target_rank=1, total_step=8, tinit=1, tfinal=3, delta_t=1)
    model, x = TwoDense(), jax.random.normal(jax.random.key(0), (16, 8))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=3, alpha=3.0, targets=(".*/kernel",), method=method)
    trainable, state = lj.split(lj.init_adapters(params, spec, jax.random.key(2)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), lj.adapter_optimizer(optax.adam(1e-2),
                                                                          trainable))

    def loss_fn(t, f, batch, rng):
        adapters = lj.join(t, f["state"])
        y = lj.apply(model, f["params"], adapters, batch)
        return jnp.mean((y - jnp.sin(batch)) ** 2) + lj.regularizer(adapters)

    step = make_train_step(loss_fn, tx)
    opt_state, frozen = tx.init(trainable), {"params": params, "state": state}
    ranks = []
    for i in range(10):  # past total_step: the final mask keeps holding
        trainable, opt_state, _ = step(trainable, opt_state, frozen, x, jax.random.key(i))
        es = [a.params["e"] for a in jax.tree.leaves(trainable, is_leaf=lj.methods.is_adapter)]
        ranks.append(sum(int(jnp.sum(e != 0)) for e in es))
    assert step._cache_size() == 1
    assert ranks[0] == 6 and ranks[-1] == 2, ranks  # 2 layers x target_rank 1
    assert ranks[4:] == [2] * 6, ranks  # from step total_step - tfinal = 5 on (index 4 is step 4)


def test_orthogonality_regularizer():
    method = lj.methods.adalora(target_rank=1, total_step=10, orth_reg_weight=0.5)
    layout = lj.Layout("dense", (4,), (3,), (4, 3))
    a = method.init(jax.random.key(0), jnp.zeros((4, 3)), layout, 2, 1.0, 0.0)
    p = jnp.eye(4)[:, :2]  # orthonormal columns
    q = jnp.eye(3)[:2]  # orthonormal rows
    ortho = lj.with_params({"x": a}, {"x": {"a": p, "e": jnp.ones(2), "b": q}})["x"]
    assert float(method.regularizer(ortho)) == 0.0
    off = lj.with_params({"x": a}, {"x": {"a": 2 * p, "e": jnp.ones(2), "b": q}})["x"]
    np.testing.assert_allclose(method.regularizer(off), 0.5 * 2 * 3.0**2)  # PᵀP − I = 3 I


def test_arguments_are_checked_and_the_config_builds_the_method():
    with pytest.raises(ValueError, match="total_step"):
        lj.methods.adalora()
    with pytest.raises(TypeError, match="did you mean 'delta_t'"):
        lj.methods.make("adalora", total_step=5, deltaT=2)
    config = importlib.import_module("configs.adalora").get_config("small")
    method = lj.methods.from_config(config.method, config.method_args.to_dict())
    assert method.total_step == config.train.steps and config.adapter.rank > method.target_rank
