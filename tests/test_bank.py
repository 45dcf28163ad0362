"""Adapter banks and combinations: a mixed batch equals each example alone with its own adapter
(any ranks, targets, layouts, scanned stacks, generation), hot swap does not retrace, slot merges,
and what each of combine's 'cat', 'svd' and 'linear' guarantees."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import PermutedToy

import lora_jax as lj
from lora_jax import rules
from lora_jax.generate import left_pad
from lora_jax.methods import bank as bank_method
from lora_jax.models import get_model

IDS = np.array([0, 1, 2, -1, 1, 0])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, adapters, x, ids=None):
    return lj.apply(model, params, adapters, x, adapter_ids=ids)


def _randomize(adapters, key):
    leaves, tree = jax.tree.flatten(adapters, is_leaf=lj.methods.is_adapter)
    out = [lj.Adapter({**a.params, "b": 0.3 * jax.random.normal(k, a.params["b"].shape)},
                      a.state, a.method, a.scale, a.layout)
           for k, a in zip(jax.random.split(key, len(leaves)), leaves)]
    return jax.tree.unflatten(tree, out)


def _three(params, layouts, targets):
    """Three adapters with different ranks, alphas and targets."""
    out = []
    for i, (rank, alpha, t) in enumerate(zip((2, 4, 3), (4.0, 4.0, 9.0), targets)):
        spec = lj.LoraSpec(rank=rank, alpha=alpha, targets=t)
        a = lj.init_adapters(params, spec, jax.random.key(10 + i), layouts=layouts)
        out.append(_randomize(a, jax.random.key(20 + i)))
    return out


@functools.cache
def _case(name):
    if name == "toy":  # embed, multi-axis DenseGeneral, permuted Einsum, Dense
        model, x = PermutedToy(), jax.random.randint(jax.random.key(3), (6, 5), 0, 50)
        targets = ((r"embed/embedding", r"query/kernel"), (r"(out|ein)/kernel",),
                   (r"(query|head|ein)/kernel", r"embed/embedding"))
    else:
        family, scan = name.split("-")
        heads = dict(n_head=4) if family == "gpt2" else dict(n_heads=4, n_kv_heads=2, d_ff=96)
        model, _ = get_model(family, "tiny", scan_layers=scan == "scan", vocab_size=64,
                             d_model=32, n_layers=2, **heads)
        x = jax.random.randint(jax.random.key(3), (6, 7), 0, 64)
        targets = (("qv",), ("all-linear",), ("attn",))
    params = lj.transform._unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
    layouts = lj.trace_layouts(model, params, x)
    return model, x, params, _three(params, layouts, targets)


@pytest.mark.parametrize("name", ["toy", "gpt2-plain",
                                  pytest.param("llama-scan", marks=pytest.mark.slow)])
def test_mixed_batch_equals_each_example_alone(name):
    model, x, params, adapters = _case(name)
    bank = lj.stack_adapters({"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    mixed = _apply(model, params, bank, x, jnp.asarray(IDS))
    for i in (-1, 0, 1, 2):  # rows do not interact, so "alone" = the whole batch on one adapter
        alone = _apply(model, params, adapters[i] if i >= 0 else {}, x)
        np.testing.assert_allclose(mixed[IDS == i], alone[IDS == i], atol=1e-5, rtol=1e-5)
    base = _apply(model, params, {}, x)
    assert not np.allclose(mixed[0], base[0], atol=1e-3)


def test_bank_layout_puts_the_slot_axis_after_the_stack():
    _, _, _, adapters = _case("llama-scan")
    bank = rules.flatten(lj.stack_adapters({"a": adapters[0], "b": adapters[1]}))
    node = bank["layers/self_attn/q_proj/kernel"]
    # q_proj (embed, heads, head_dim) stacked over 2 layers; ranks 2 and 4 -> 4.
    assert node.params["a"].shape == (2, 2, 32, 4)
    assert node.params["b"].shape == (2, 2, 4, 4, 8)
    assert node.scale == 1.0 and node.method.name == "bank"
    only_b = bank["layers/mlp/up_proj/kernel"]  # slot 0 has no adapter there: zeros
    assert not np.any(only_b.params["a"][:, 0]) and np.any(only_b.params["a"][:, 1])


@pytest.mark.slow
def test_bank_in_generate_equals_each_adapter_alone():
    model, _, params, adapters = _case("gpt2-plain")
    bank = lj.stack_adapters({"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    prompts = [[5, 1, 9], [3, 4], [7], [2, 2, 2], [8, 6], [1, 1]]
    tokens, mask = left_pad(prompts)
    mixed = lj.generate(model, params, bank, tokens, 5, prompt_mask=mask,
                        adapter_ids=jnp.asarray(IDS))
    for i in range(3):
        alone = lj.generate(model, params, adapters[i], tokens, 5, prompt_mask=mask)
        np.testing.assert_array_equal(mixed[IDS == i], alone[IDS == i])
    base = lj.generate(model, params, None, tokens, 5, prompt_mask=mask)
    np.testing.assert_array_equal(mixed[IDS == -1], base[IDS == -1])


def test_hot_swap_does_not_retrace():
    model, x, params, adapters = _case("toy")
    traces = []

    @jax.jit
    def forward(params, bank, x, ids):
        traces.append(1)
        return lj.apply(model, params, bank, x, adapter_ids=ids)

    bank = lj.stack_adapters({"a": adapters[0], "b": adapters[1], "c": adapters[2]})
    forward(params, bank, x, jnp.asarray(IDS))
    swapped = lj.set_slot(bank, 1, adapters[0])  # slot 1 now holds adapter 0
    out = forward(params, swapped, x, jnp.asarray(IDS))
    again = [_randomize(a, jax.random.key(99)) for a in adapters]  # other weights, same ranks
    forward(params, lj.stack_adapters({"x": again[0], "y": again[1], "z": again[2]}), x,
            jnp.asarray(IDS[::-1].copy()))
    assert len(traces) == 1 and forward._cache_size() == 1
    ref = lj.apply(model, params, adapters[0], x)
    np.testing.assert_allclose(out[IDS == 1], ref[IDS == 1], atol=1e-5)


def test_set_slot_refuses_a_larger_rank():
    _, _, params, adapters = _case("toy")
    bank = lj.stack_adapters({"a": adapters[0], "b": adapters[0]})  # embed, query at rank 2
    bigger = {k: v for k, v in rules.flatten(adapters[2]).items() if k in rules.flatten(bank)}
    with pytest.raises(ValueError, match="rank 3 > the bank's 2"):
        lj.set_slot(bank, 0, rules.unflatten(bigger))
    with pytest.raises(ValueError, match="has no adapter at"):
        lj.set_slot(bank, 0, adapters[1])


def test_merge_one_slot_equals_merging_that_adapter():
    _, _, params, adapters = _case("llama-scan")
    bank = lj.stack_adapters({"a": adapters[0], "b": adapters[1]})
    got = rules.flatten(lj.merge(params, bank, task=1))
    want = rules.flatten(lj.merge(params, adapters[1]))
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=1e-6)
    with pytest.raises(ValueError, match="task=slot"):
        lj.merge(params, bank)


def test_bad_ids_raise():
    model, x, params, adapters = _case("toy")
    bank = lj.stack_adapters({"a": adapters[0]})
    with pytest.raises(ValueError, match="needs adapter_ids"):
        lj.apply(model, params, bank, x)
    with pytest.raises(ValueError, match=r"outside \[-1, 1\)"):
        lj.apply(model, params, bank, x, adapter_ids=jnp.array([0, 1, 0, 0, 0, 0]))


def test_per_example_einsums():
    assert bank_method.per_example("...a,aR->...R") == "Z...a,ZaR->Z...R"
    assert bank_method.per_example("btd,dR->btR") == "btd,bdR->btR"
    with pytest.raises(ValueError, match="batch axis"):
        bank_method.per_example("dt,dR->tR")


# ----------------------------------------------------------------------------- combine


def _delta(adapters_list, weights, path):
    return sum(w * a.scale * np.asarray(lj.layers.product(a.layout, a.params["a"], a.params["b"]))
               for t, w in zip(adapters_list, weights)
               if (a := rules.flatten(t).get(path)) is not None)


def _product(tree, path):
    a = rules.flatten(tree)[path]
    return a.scale * np.asarray(lj.layers.product(a.layout, a.params["a"], a.params["b"]))


def test_cat_is_the_exact_weighted_sum_of_deltas():
    _, _, _, adapters = _case("toy")
    weights = (0.5, -1.5, 2.0)
    cat = lj.combine(adapters, weights, how="cat")
    for path, a in rules.flatten(cat).items():
        np.testing.assert_allclose(_product(cat, path), _delta(adapters, weights, path),
                                   atol=1e-5)
    assert rules.flatten(cat)["query/kernel"].rank == 2 + 3  # adapters 0 and 2 adapt query


def test_svd_is_the_best_rank_r_approximation():
    _, _, _, adapters = _case("llama-scan")  # stacked kernels: an SVD per layer
    weights = (1.0, 0.7, 0.3)
    svd = lj.combine(adapters, weights, how="svd", rank=3)
    path = "layers/self_attn/q_proj/kernel"  # all three adapt it: Δ has rank up to 9
    node = rules.flatten(svd)[path]
    delta = _delta(adapters, weights, path).reshape(2, 32, 32)
    approx = _product(svd, path).reshape(2, 32, 32)
    for layer in range(2):
        u, s, vh = np.linalg.svd(delta[layer])
        best = (u[:, :3] * s[:3]) @ vh[:3]
        np.testing.assert_allclose(approx[layer], best, atol=1e-4)
        err = np.linalg.norm(approx[layer] - delta[layer])
        np.testing.assert_allclose(err, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)  # Eckart–Young
    assert node.rank == 3
    full = lj.combine(adapters, weights, how="svd", rank=9)  # rank >= rank(Δ): exact
    np.testing.assert_allclose(_product(full, path), _delta(adapters, weights, path), atol=1e-4)


def test_linear_is_pefts_weighted_sum_of_factors():
    _, _, _, adapters = _case("toy")
    a0 = adapters[1]
    a1 = _randomize(a0, jax.random.key(5))
    a1 = jax.tree.map(lambda a: lj.Adapter({"a": a.params["a"] * 2, "b": a.params["b"]},
                                           {}, a.method, a.scale, a.layout),
                      a1, is_leaf=lj.methods.is_adapter)
    lin = rules.flatten(lj.combine([a0, a1], (0.6, 0.4), how="linear"))
    for path, node in lin.items():
        x, y = rules.flatten(a0)[path], rules.flatten(a1)[path]
        c0, c1 = np.sqrt(0.6 * x.scale), np.sqrt(0.4 * y.scale)
        np.testing.assert_allclose(node.params["a"], c0 * x.params["a"] + c1 * y.params["a"],
                                   atol=1e-6)
        np.testing.assert_allclose(node.params["b"], c0 * x.params["b"] + c1 * y.params["b"],
                                   atol=1e-6)
    one = lj.combine([a0], (0.25,), how="linear")  # a single adapter: w · s · A B exactly
    path = "out/kernel"
    np.testing.assert_allclose(_product(one, path), 0.25 * _product(a0, path), atol=1e-6)
    with pytest.raises(ValueError, match="equal ranks"):
        lj.combine([adapters[0], adapters[2]], (1.0, 1.0), how="linear")
