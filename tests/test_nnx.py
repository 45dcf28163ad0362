"""NNX models get the same adapter math (materialised): Linear, Einsum and Embed."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora_jax as lj
from lora_jax import nnx as ljnnx


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])

    def __call__(self, ids):
        h = self.proj(self.embed(ids)).reshape(ids.shape + (8,))
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return h


def _net_and_adapters(method="lora"):
    model = Net(nnx.Rngs(0))
    targets = (r"proj/kernel", r"layers/\d+/kernel") + ((r"embed/embedding",)
                                                        if method == "lora" else ())
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=targets, method=method)
    adapters = lj.init_adapters(ljnnx.params(model), spec, jax.random.key(1),
                                layouts=ljnnx.layouts(model))
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape)
                                         if p[-1].key in ("a", "b") else l
                                         for k, (p, l) in zip(keys, leaves)])
    return model, adapters


IDS = jnp.array([[1, 2, 3], [4, 5, 6]])


def test_nnx_adapter_math_matches_the_hand_computed_forward():
    model, adapters = _net_and_adapters()
    y = ljnnx.apply(model, adapters, IDS)
    p = ljnnx.params(model)

    def lora(path_a, w):
        a = adapters
        for k in path_a:
            a = a[k]
        return w + a.scale * jnp.einsum(a.layout.ab, a.params["a"], a.params["b"])

    emb = lora(("embed", "embedding"), p["embed"]["embedding"])
    proj = lora(("proj", "kernel"), p["proj"]["kernel"])
    h = (jnp.einsum("btd,dnh->btnh", emb[IDS], proj) + p["proj"]["bias"]).reshape(2, 3, 8)
    for i in ("0", "1"):
        w = lora(("layers", i, "kernel"), p["layers"][i]["kernel"])
        h = jnp.tanh(h @ w + p["layers"][i]["bias"])
    np.testing.assert_allclose(y, h, atol=1e-5)
    assert np.abs(y - model(IDS)).max() > 1e-3  # the adapters change the output
    np.testing.assert_allclose(ljnnx.params(model)["proj"]["kernel"], p["proj"]["kernel"])


def test_nnx_gradients_reach_the_adapters_and_dora_works():
    for method in ("lora", "dora"):
        model, adapters = _net_and_adapters(method)
        grads = jax.jit(jax.grad(lambda a: jnp.sum(ljnnx.apply(model, a, IDS) ** 2)))(adapters)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            if path[-1].key in ("a", "b"):
                assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_nnx_layouts_cover_linear_einsum_embed():
    model, _ = _net_and_adapters()
    layouts = ljnnx.layouts(model)
    assert layouts["proj/kernel"].in_shape == (8,) and layouts["proj/kernel"].out_shape == (2, 4)
    assert layouts["embed/embedding"].kind == "embed"
    assert layouts["layers/1/kernel"].kernel_shape == (8, 8)
