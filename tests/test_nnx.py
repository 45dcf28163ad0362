"""NNX at parity with linen: every layer kind factored == merged, merge/unmerge, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax as lj
from lora_jax import nnx as ljnnx


class Net(nnx.Module):
    """Embed -> Einsum (multi-axis out) -> LinearGeneral (multi-axis in) -> Linears -> Conv."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
        self.merge_heads = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
        self.conv = nnx.Conv(8, 6, (3,), padding="SAME", rngs=rngs)

    def __call__(self, ids):
        h = self.merge_heads(jnp.tanh(self.proj(self.embed(ids))))
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return self.conv(h)


IDS = jnp.array([[1, 2, 3, 7], [4, 5, 6, 0]])
ALL = (r"embed/embedding", r"proj/kernel", r"merge_heads/kernel", r"layers/\d+/kernel",
       r"conv/kernel")


def _adapters(model, targets, method="lora", **spec):
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=targets, method=method, **spec)
    adapters = lj.init_adapters(ljnnx.params(model), spec, jax.random.key(1),
                                layouts=ljnnx.layouts(model))
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape)
                                     if p[-1].key in ("a", "b") else l
                                     for k, (p, l) in zip(keys, leaves)])


@pytest.mark.parametrize("method,target", [("lora", t) for t in ALL]
                         + [("dora", t) for t in ALL[1:]])
def test_factored_equals_merged_for_each_layer_kind(method, target):
    model = Net(nnx.Rngs(0))
    adapters = _adapters(model, (target,), method)
    y = jax.jit(lambda a: ljnnx.apply(model, a, IDS))(adapters)
    np.testing.assert_allclose(y, ljnnx.merge(model, adapters)(IDS), atol=1e-5)
    assert np.abs(y - model(IDS)).max() > 1e-3  # the adapter changes the output


def test_factored_path_forms_no_dense_weight_update():
    big = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
    adapters = _adapters(big, ("kernel",))
    x = jnp.ones((3, 64))
    jaxpr = jax.make_jaxpr(lambda a: ljnnx.apply(big, a, x))(adapters)
    shapes = [tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars]
    assert (64, 48) not in shapes, "the factored path formed a kernel-shaped array"
    merged = jax.make_jaxpr(lambda a: ljnnx.merge(big, a)(x))(adapters)
    assert (64, 48) in [tuple(v.aval.shape) for e in merged.eqns for v in e.outvars]


def test_merge_unmerge_roundtrip_and_the_model_is_never_mutated():
    model = Net(nnx.Rngs(0))
    before = jax.tree.map(np.array, ljnnx.params(model))
    adapters = _adapters(model, ALL)
    merged = ljnnx.merge(model, adapters)
    back = ljnnx.params(ljnnx.unmerge(merged, adapters))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, before)
    assert np.abs(ljnnx.params(merged)["conv"]["kernel"] - before["conv"]["kernel"]).max() > 1e-3
    ljnnx.apply(model, adapters, IDS)
    jax.tree.map(np.testing.assert_array_equal, ljnnx.params(model), before)
    assert isinstance(model.layers[0], nnx.Linear)  # the substitution happened on a copy


def test_gradients_reach_only_the_adapters():
    model = Net(nnx.Rngs(0))
    adapters = _adapters(model, ALL)
    trainable, state = lj.split(adapters)
    loss = lambda t: jnp.sum(ljnnx.apply(model, lj.join(t, state), IDS) ** 2)
    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
    # Base parameters are closed over: nothing in the gradient has a base parameter's size.
    n_base = lj.count_params(ljnnx.params(model))
    assert lj.count_params(grads) == lj.count_params(trainable) < n_base


def test_modules_to_save_and_adapter_dropout():
    model = Net(nnx.Rngs(0))
    spec = lj.LoraSpec(rank=2, targets=(r"layers/0/kernel",), modules_to_save=(r"conv/bias",),
                       dropout=0.5)
    adapters = lj.init_adapters(ljnnx.params(model), spec, jax.random.key(0),
                                layouts=ljnnx.layouts(model))
    adapters = jax.tree.map(lambda x: x + 0.5, adapters)
    np.testing.assert_allclose(ljnnx.apply(model, adapters, IDS),
                               ljnnx.merge(model, adapters)(IDS), atol=1e-5)
    with pytest.raises(ValueError, match="pass key="):
        ljnnx.apply(model, adapters, IDS, train=True)
    y1 = ljnnx.apply(model, adapters, IDS, train=True, key=jax.random.key(1))
    y2 = ljnnx.apply(model, adapters, IDS, train=True, key=jax.random.key(2))
    assert np.abs(y1 - y2).max() > 1e-4


def test_layouts_cover_every_kind_and_name_what_cannot_be_adapted():
    model = Net(nnx.Rngs(0))
    lay = ljnnx.layouts(model)
    assert lay["proj/kernel"].in_shape == (8,) and lay["proj/kernel"].out_shape == (2, 4)
    assert lay["merge_heads/kernel"].in_shape == (2, 4)
    assert lay["embed/embedding"].kind == "embed" and lay["conv/kernel"].kind == "conv"
    assert lay["layers/1/kernel"].kernel_shape == (8, 8)
    bad = nnx.LinearGeneral((2, 4), 8, axis=(1, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="negative `axis`"):
        ljnnx.layouts(bad)
    with pytest.raises(ValueError, match=r"lj\.nnx\.layouts\(model\)"):
        lj.init_adapters(ljnnx.params(model), lj.LoraSpec(targets=("proj/kernel",)),
                         jax.random.key(0))


class Tied(nnx.Module):
    """An embedding table used for the lookup and, transposed, as the output head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.mid = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.mid(self.embed(ids))))


def test_zero_init_is_base_and_a_tied_head_reads_the_adapted_table():
    model = Tied(nnx.Rngs(0))
    spec = lj.LoraSpec(rank=2, targets=(r"embed/embedding", r"mid/kernel"))
    init = lj.init_adapters(ljnnx.params(model), spec, jax.random.key(0),
                            layouts=ljnnx.layouts(model))
    factored = jax.jit(lambda a: ljnnx.apply(model, a, IDS))
    np.testing.assert_allclose(factored(init), model(IDS), atol=1e-6)
    adapters = _adapters(model, (r"embed/embedding", r"mid/kernel"))
    np.testing.assert_allclose(factored(adapters), ljnnx.merge(model, adapters)(IDS), atol=1e-5)


# ----------------------------------------------------------------------------- conformance


def registered() -> list[str]:
    return [m for m in lj.methods.known() if m != "saved"]  # saved: modules_to_save, above


def build(name: str) -> lj.Method:
    return lj.methods.make(name, **getattr(lj.methods._factory(name), "example_args", {}))


def randomize(adapters, seed: int = 3):
    trainable, state = lj.split(adapters)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return lj.join(jax.tree.unflatten(tree, leaves), state)


@pytest.mark.parametrize("name", registered())
def test_conformance_every_registered_method_on_nnx(name):
    """tests/methods/test_conformance.py's checks on an NNX model: identity init is the base,
    factored == merged (per task for routing methods), unmerge(merge) is the base, and
    gradients reach the trainable leaves only."""
    method = build(name)
    model = Net(nnx.Rngs(0))
    spec = lj.LoraSpec(rank=2, alpha=4.0, method=method,
                       targets=(r"proj/kernel", r"merge_heads/kernel", r"layers/\d+/kernel"))
    adapters = lj.init_adapters(ljnnx.params(model), spec, jax.random.key(1),
                                layouts=ljnnx.layouts(model))
    model, adapters = ljnnx.transform_base(model, adapters)
    routes = type(method).merge_task is not lj.Method.merge_task
    task_ids = jnp.arange(2) % 3 if routes else None
    factored = jax.jit(lambda a: ljnnx.apply(model, a, IDS, task_ids=task_ids))
    base = model(IDS)
    np.testing.assert_allclose(factored(adapters), base, atol=1e-5)
    adapters = randomize(adapters)
    y = factored(adapters)
    assert float(jnp.max(jnp.abs(y - base))) > 1e-3, "the adapters change nothing"
    for t in (range(3) if routes else [None]):
        merged = ljnnx.merge(model, adapters, task=t)
        rows = np.arange(2) if t is None else np.asarray(task_ids == t)
        np.testing.assert_allclose(merged(IDS)[rows], y[rows], atol=1e-4)
        back = ljnnx.params(ljnnx.unmerge(merged, adapters, task=t))
        jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-4), back,
                     ljnnx.params(model))
    trainable, state = lj.split(adapters)
    loss = lambda t: jnp.mean(ljnnx.apply(model, lj.join(t, state), IDS, task_ids=task_ids) ** 2)
    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
