"""LoRA-FA: A frozen in the adapter state (no gradient, no optimizer state, unchanged by
training), LoRA's output for the same A and B, a trainable embedding init, a smaller compiled
train step than LoRA's, and its config. The conformance suite covers the rest."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.train import make_train_step


class Mlp(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(32, self.width, name="embed")(ids)
        for i in range(3):
            x = x + nn.Dense(self.width, name=f"dense_{i}")(jnp.tanh(x))
        return nn.Dense(32, name="head")(x)


def _setup(method, width=16, batch=(4, 8), targets=(r"(embed/embedding|dense_\d/kernel)",)):
    model = Mlp(width)
    ids = jax.random.randint(jax.random.key(0), batch, 0, 32)
    params = model.init(jax.random.key(1), ids)["params"]
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=targets, method=method)
    return model, ids, params, lj.init_adapters(params, spec, jax.random.key(2))


def _loss(model, params, ids):
    def loss_fn(t, f, batch, rng):
        logits = lj.apply(model, f["params"], lj.join(t, f["state"]), batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch).mean()
    return loss_fn


def test_only_b_trains_a_stays_as_initialised():
    model, ids, params, adapters = _setup(lj.methods.lora_fa())
    trainable, state = lj.split(adapters)
    for a in jax.tree.leaves(trainable, is_leaf=lj.methods.is_adapter):
        assert set(a.params) == {"b"}
    tx = lj.adapter_optimizer(optax.adam(1e-2), trainable)
    opt_state = tx.init(trainable)
    n_b = sum(a.params["b"].size for a in jax.tree.leaves(trainable, is_leaf=lj.methods.is_adapter))
    n_moments = sum(x.size for x in jax.tree.leaves(opt_state) if jnp.ndim(x) > 0)
    assert n_moments == 2 * n_b, "Adam keeps state for something other than B"
    frozen = {"params": params, "state": state}
    a_before = jax.tree.map(np.asarray, state)
    step = make_train_step(_loss(model, params, ids), tx)
    losses = []
    for i in range(3):
        trainable, opt_state, m = step(trainable, opt_state, frozen, ids, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, state, a_before)
    for a in jax.tree.leaves(trainable, is_leaf=lj.methods.is_adapter):
        assert float(jnp.max(jnp.abs(a.params["b"]))) > 0, "B did not train (embedding init?)"


def test_output_and_merge_are_loras_for_the_same_a_and_b():
    model, ids, params, fa = _setup(lj.methods.lora_fa())
    _, _, _, lo = _setup(lj.methods.lora())
    b = lambda a: jax.random.normal(jax.random.key(5), a.params["b"].shape)
    is_a = lj.methods.is_adapter
    one = lambda a, params: lj.with_params({"x": a}, {"x": params})["x"]
    fa = jax.tree.map(lambda a: one(a, {"b": b(a)}), fa, is_leaf=is_a)
    lo = jax.tree.map(lambda a, f: one(a, {"a": f.state["a"], "b": b(a)}), lo, fa, is_leaf=is_a)
    want = lj.apply(model, params, lo, ids)
    assert float(jnp.max(jnp.abs(want - model.apply({"params": params}, ids)))) > 1e-2
    np.testing.assert_allclose(lj.apply(model, params, fa, ids), want, atol=1e-5)
    for p, q in zip(jax.tree.leaves(lj.merge(params, fa)), jax.tree.leaves(lj.merge(params, lo))):
        np.testing.assert_allclose(p, q, atol=1e-6)


def test_train_step_needs_less_memory_than_loras():
    """LoRA keeps each adapted layer's input x for A's gradient; LoRA-FA only x·A (rank 4)."""
    peak = {}
    for name in ("lora", "lora_fa"):
        model, ids, params, adapters = _setup(lj.methods.make(name), width=256, batch=(8, 64),
                                              targets=(r"dense_\d/kernel",))
        trainable, state = lj.split(adapters)
        tx = lj.adapter_optimizer(optax.sgd(1e-2), trainable)
        step = make_train_step(_loss(model, params, ids), tx)
        m = step.lower(trainable, tx.init(trainable), {"params": params, "state": state}, ids,
                       jax.random.key(0)).compile().memory_analysis()
        peak[name] = m.temp_size_in_bytes
    assert peak["lora_fa"] < peak["lora"], peak


def test_config_builds_the_method():
    config = importlib.import_module("configs.lora_fa").get_config("small")
    method = lj.methods.from_config(config.method, config.method_args.to_dict())
    assert method == lj.methods.lora_fa()
