"""Core transform invariants: B=0 is the base, factored == materialised == merged, unmerge, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from toys import ConvNet, Stack

import lora_jax as lj
from lora_jax import layers, rules


class Toy(nn.Module):
    """Every adaptable layer type: Embed, multi-axis DenseGeneral (in and out), Einsum, Dense."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 16, name="embed")(ids)
        q = nn.DenseGeneral((2, 4), name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x)
        h = nn.DenseGeneral(16, axis=(-2, -1), name="out")(q * v)
        h = nn.Einsum((16, 3, 8), "btd,dnh->btnh", name="ein")(h)
        h = h.reshape(h.shape[:2] + (24,))
        return nn.Dense(10, name="head")(jnp.tanh(h))


class Tied(nn.Module):
    """An embedding table used for the lookup and, transposed, as the LM head (GPT-2 style)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 16, name="embed")
        return embed.attend(jnp.tanh(nn.Dense(16, name="mid")(embed(ids))))








ALL = (r"embed/embedding", r"(query|value|out|ein|head)/kernel")


def _setup(model, x, targets=ALL, **spec_kw):
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lj.trace_layouts(model, params, x)
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=targets, **spec_kw)
    adapters = lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    return params, adapters


def _randomize(adapters, seed=2):
    """Non-zero A and B (and modules_to_save deltas) everywhere, so every adapter does something."""
    paths_leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
    return jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, l.shape) if p[-1].key in ("a", "b", "w") else l
               for k, (p, l) in zip(keys, paths_leaves)])


IDS = jax.random.randint(jax.random.key(3), (2, 5), 0, 50)
IMG = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
SEQ = jax.random.normal(jax.random.key(5), (2, 4, 16))
CASES = {
    "toy": (Toy(), IDS, ALL),
    "conv": (ConvNet(), IMG, (r"conv/kernel",)),
    "scan": (Stack(), SEQ, (r"blocks/(up|down)/kernel",)),
    "tied": (Tied(), IDS, (r"embed/embedding", r"mid/kernel")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_zero_init_is_base(case, method):
    model, x, targets = CASES[case]
    if method == "dora" and case in ("toy", "tied"):
        targets = targets[1:]  # DoRA adapts kernels, not embedding tables
    params, adapters = _setup(model, x, targets, method=method)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(lj.apply(model, params, adapters, x), base, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_factored_equals_materialised_equals_merged(case, method):
    model, x, targets = CASES[case]
    if method == "dora" and case in ("toy", "tied"):
        targets = targets[1:]
    params, adapters = _setup(model, x, targets, method=method)
    adapters = _randomize(adapters)
    factored = lj.apply(model, params, adapters, x)
    merged = model.apply({"params": lj.merge(params, adapters)}, x)
    materialised = lj.materialized(lambda p, x: model.apply({"params": p}, x))(params, adapters, x)
    base = model.apply({"params": params}, x)
    assert np.abs(factored - base).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(factored, merged, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(materialised, merged, atol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_unmerge_inverts_merge(method):
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets[1:], method=method)
    adapters = _randomize(adapters)
    back = lj.unmerge(lj.merge(params, adapters), adapters)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, params)


def test_adapter_shapes_follow_kernel_axes():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets)
    shapes = {p: (a.params["a"].shape, a.params["b"].shape)
              for p, a in rules.flatten(adapters).items()}
    assert shapes["query/kernel"] == ((16, 2), (2, 2, 4))
    assert shapes["out/kernel"] == ((2, 4, 2), (2, 16))
    assert shapes["ein/kernel"] == ((16, 2), (2, 3, 8))
    assert shapes["embed/embedding"] == ((50, 2), (2, 16))
    scan_params, scan_adapters = _setup(*CASES["scan"][:2], CASES["scan"][2])
    up = rules.flatten(scan_adapters)["blocks/up/kernel"]
    assert (up.params["a"].shape, up.params["b"].shape) == ((3, 16, 2), (3, 2, 2, 8))
    assert up.layout.n_stack == 1


def test_gradients_reach_every_adapter_factor_and_only_adapters():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets)
    adapters = _randomize(adapters)

    def loss(adapters):
        return jnp.sum(lj.apply(model, params, adapters, x) ** 2)

    grads = jax.grad(loss)(adapters)
    # The gradient tree is the adapter tree: nothing for the base exists at all.
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(leaf).max() > 0, jax.tree_util.keystr(path)


def test_frozen_base_has_no_optimizer_state():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets[1:], method="dora")
    trainable, state = lj.split(adapters)
    tx = lj.adapter_optimizer(optax.adamw(1e-3), adapters)
    opt_state = tx.init(adapters)
    # Adam keeps 2 moments per trainable scalar; DoRA's frozen base norms get none.
    n_state = sum(np.size(l) for l in jax.tree.leaves(opt_state) if np.ndim(l) > 0)
    assert n_state == 2 * lj.count_params(trainable)
    assert lj.count_params(state) > 0  # the frozen DoRA base norms exist, without moments

    def loss(t):
        return jnp.sum(lj.apply(model, params, lj.join(t, state), x) ** 2)

    grads = jax.grad(loss)(trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    assert jax.tree.structure(updates) == jax.tree.structure(trainable)


def test_lora_plus_scales_b_updates():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets)
    adapters = _randomize(adapters)
    _, with_plus = _setup(model, x, targets, method=lj.methods.lora(lora_plus_ratio=16.0))
    with_plus = _randomize(with_plus)
    grads = jax.grad(lambda a: jnp.sum(lj.apply(model, params, a, x) ** 2))(adapters)
    plain = lj.adapter_optimizer(optax.sgd(0.1), adapters)
    plus = lj.adapter_optimizer(optax.sgd(0.1), with_plus)
    plus_grads = jax.tree.map(lambda a, g: dataclasses.replace(a, params=g.params), with_plus,
                              grads, is_leaf=lj.methods.is_adapter)
    u0, _ = plain.update(grads, plain.init(adapters), adapters)
    u1, _ = plus.update(plus_grads, plus.init(with_plus), with_plus)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(u0), jax.tree.leaves(u1)):
        ratio = 16.0 if path[-1].key == "b" else 1.0
        np.testing.assert_allclose(b, ratio * a, rtol=1e-6)


def test_modules_to_save_trains_the_head_fully():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, (r"query/kernel",), modules_to_save=(r"head/.*",))
    flat = rules.flatten(adapters)
    assert flat["head/kernel"].method.name == "saved" and flat["head/bias"].method.name == "saved"
    adapters = _randomize(adapters)
    np.testing.assert_allclose(lj.apply(model, params, adapters, x),
                               model.apply({"params": lj.merge(params, adapters)}, x), atol=1e-5)
    back = lj.unmerge(lj.merge(params, adapters), adapters)
    np.testing.assert_allclose(back["head"]["kernel"], params["head"]["kernel"], atol=1e-6)


def test_scaling_and_rslora():
    params = {"layer": {"kernel": jnp.ones((16, 16))}}
    plain = lj.init_adapters(params, lj.LoraSpec(rank=4, alpha=8.0, targets=("layer/kernel",)),
                             jax.random.key(0))
    rs = lj.init_adapters(params, lj.LoraSpec(rank=4, alpha=8.0, targets=("layer/kernel",),
                                              rslora=True), jax.random.key(0))
    assert plain["layer"]["kernel"].scale == 2.0 and rs["layer"]["kernel"].scale == 4.0


def test_per_rule_rank_and_alpha_first_rule_wins():
    model, x, _ = CASES["toy"]
    params = model.init(jax.random.key(0), x)["params"]
    spec = lj.LoraSpec(rank=2, alpha=2.0, targets=(lj.Rule(r"query/kernel", rank=4, alpha=16.0),
                                                   r"(query|value)/kernel"))
    adapters = lj.init_adapters(params, spec, jax.random.key(0),
                                layouts=lj.trace_layouts(model, params, x))
    q, v = adapters["query"]["kernel"], adapters["value"]["kernel"]
    assert (q.rank, q.scale, v.rank, v.scale) == (4, 4.0, 2, 1.0)


def test_inits():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    params = {"l": {"kernel": w}}
    d = lj.init_adapters(params, lj.LoraSpec(rank=8, targets=("l/kernel",)), jax.random.key(1))
    a = d["l"]["kernel"].params["a"]
    assert np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).max() > 0.9 / np.sqrt(64)
    assert not np.any(d["l"]["kernel"].params["b"])
    g = lj.init_adapters(params, lj.LoraSpec(rank=8, targets=("l/kernel",),
                                                 method=lj.methods.lora(init_weights="gaussian")),
                         jax.random.key(1))
    assert abs(np.std(g["l"]["kernel"].params["a"]) - 1 / 8) < 0.02


def test_pissa_residual_plus_principal_is_the_kernel():
    w = jax.random.normal(jax.random.key(0), (24, 16))
    params = {"l": {"kernel": w}}
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=("l/kernel",),
                       method=lj.methods.lora(init_weights="pissa"))
    adapters = lj.init_adapters(params, spec, jax.random.key(1))
    residual, _ = lj.transform_base(params, adapters)
    np.testing.assert_allclose(lj.merge(residual, adapters)["l"]["kernel"], w, atol=1e-5)
    u, s, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    np.testing.assert_allclose(w - residual["l"]["kernel"], principal, atol=1e-4)


def test_dropout_only_on_the_adapter_branch():
    d = 4
    model = nn.Dense(d)
    x = jax.random.normal(jax.random.key(0), (64, d))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=d, alpha=float(d), targets=("kernel",), dropout=0.5)
    adapters = _randomize(lj.init_adapters(params, spec, jax.random.key(2)))
    y = lj.apply(model, params, adapters, x, train=True, rngs={"dropout": jax.random.key(3)})
    base = model.apply({"params": params}, x)
    a = adapters["kernel"].params
    dropped = (y - base) @ np.linalg.inv(np.asarray(a["a"] @ a["b"]))  # = drop(x)
    kept = np.isclose(dropped, 2 * x, atol=1e-3)
    zero = np.isclose(dropped, 0, atol=1e-3)
    assert np.all(kept | zero) and 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(lj.apply(model, params, adapters, x),
                               base + x @ a["a"] @ a["b"], atol=1e-4)


def test_dora_norm_is_detached():
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=2, alpha=2.0, targets=("kernel",), method="dora")
    adapters = _randomize(lj.init_adapters(params, spec, jax.random.key(2)))
    ours = jax.grad(lambda ad: jnp.sum(lj.apply(model, params, ad, x) ** 2))(adapters)

    def reference(a, b, m, detach):
        v = params["kernel"] + a @ b
        n = jnp.linalg.norm(v, axis=0)
        n = jax.lax.stop_gradient(n) if detach else n
        return jnp.sum((x @ (m * v / n) + params["bias"]) ** 2)

    p = adapters["kernel"].params
    detached = jax.grad(reference, argnums=(0, 1, 2))(p["a"], p["b"], p["m"], True)
    attached = jax.grad(reference, argnums=(0, 1, 2))(p["a"], p["b"], p["m"], False)
    np.testing.assert_allclose(ours["kernel"].params["a"], detached[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["kernel"].params["m"], detached[2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(detached[0], attached[0], atol=1e-3)


def test_dora_magnitude_starts_at_column_norms():
    w = jax.random.normal(jax.random.key(0), (8, 6))
    adapters = lj.init_adapters({"kernel": w}, lj.LoraSpec(rank=2, targets=("kernel",),
                                                           method="dora"), jax.random.key(0))
    np.testing.assert_allclose(adapters["kernel"].params["m"], np.linalg.norm(w, axis=0),
                               rtol=1e-6)


def test_merge_into_bf16_keeps_dtype():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets[1:])
    adapters = _randomize(adapters)
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    merged = lj.merge(bf16, adapters)
    assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(merged))
    exact = lj.merge(jax.tree.map(lambda p: p.astype(jnp.float32), bf16), adapters)
    err = np.abs(merged["query"]["kernel"].astype(np.float32) - exact["query"]["kernel"])
    assert err.max() <= np.abs(exact["query"]["kernel"]).max() * 2 ** -8


def test_gpt2_small_qkv_rank8_parameter_count():
    # GPT-2 small: 12 layers of a fused qkv kernel (768, 3, 12, 64), as in lora_jax.models.
    params = {f"h_{i}": {"attn": {"c_attn": {"kernel": jax.ShapeDtypeStruct((768, 3, 12, 64),
                                                                            jnp.float32)}}}
              for i in range(12)}
    layout = lj.layers.dense_layout((768, 3, 12, 64), 1)
    layouts = {f"h_{i}/attn/c_attn/kernel": layout for i in range(12)}
    spec = lj.LoraSpec(rank=8, alpha=16.0, targets=("qv",))
    adapters = jax.eval_shape(lambda: lj.init_adapters(params, spec, jax.random.key(0),
                                                       layouts=layouts))
    assert lj.count_params(adapters) == 294_912


def test_summary_reports_paths_and_share():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets)
    text = lj.summary(params, adapters)
    assert "query/kernel" in text and "embed/embedding" in text
    n = lj.count_params(adapters)
    assert f"trainable params: {n:,}" in text


# ----------------------------------------------------------------------------- errors


def test_rule_matching_nothing_names_closest_paths():
    model, x, _ = CASES["toy"]
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"'querry/kernel' matched no parameter; closest: "
                                         r".*query/kernel"):
        lj.init_adapters(params, lj.LoraSpec(targets=("querry/kernel",)), jax.random.key(0))


@pytest.mark.parametrize("rank,msg", [(0, "rank must be positive"), (-1, "rank must be positive"),
                                      (17, "exceeds min")])
def test_bad_rank(rank, msg):
    params = {"l": {"kernel": jnp.ones((16, 32))}}
    with pytest.raises(ValueError, match=msg):
        lj.init_adapters(params, lj.LoraSpec(rank=rank, targets=("l/kernel",)), jax.random.key(0))


def test_adapters_on_other_shapes_are_rejected():
    model, x, _ = CASES["toy"]
    params = model.init(jax.random.key(0), x)["params"]
    adapters = lj.init_adapters({"head": {"kernel": jnp.ones((12, 10))}},
                                lj.LoraSpec(rank=2, targets=("head/kernel",)), jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        lj.merge(params, adapters)
    with pytest.raises(ValueError, match="shape"):
        lj.apply(model, params, adapters, x)


def test_multi_axis_kernel_without_layout_asks_for_a_trace():
    model, x, _ = CASES["toy"]
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="trace_layouts"):
        lj.init_adapters(params, lj.LoraSpec(targets=("query/kernel",)), jax.random.key(0))


def test_dora_dropout_rescales_the_dropped_inputs_base_output():
    """PEFT / the DoRA authors: y = x W + b + (g − 1)·drop(x) W + g·s·drop(x) A B."""
    d = 4
    model = nn.Dense(d)
    x = jax.random.normal(jax.random.key(0), (64, d))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=d, alpha=float(d), targets=("kernel",), dropout=0.5, method="dora")
    dora = _randomize(lj.init_adapters(params, spec, jax.random.key(2)))
    p = dora["kernel"].params
    lora = {"kernel": dataclasses.replace(dora["kernel"], method=lj.methods.lora(), state={},
                                          params={"a": p["a"], "b": p["b"]})}
    rngs = {"dropout": jax.random.key(3)}
    base = model.apply({"params": params}, x)
    y_lora = lj.apply(model, params, lora, x, train=True, rngs=rngs)
    dropped = (y_lora - base) @ np.linalg.inv(np.asarray(p["a"] @ p["b"]))  # = drop(x), same rng
    w = params["kernel"]
    g = p["m"] / np.linalg.norm(w + p["a"] @ p["b"], axis=0)
    want = base + (g - 1) * (dropped @ w) + g * (dropped @ p["a"] @ p["b"])
    np.testing.assert_allclose(lj.apply(model, params, dora, x, train=True, rngs=rngs), want,
                               atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_pissa_base_is_the_exact_residual_for_lora_and_dora(method):
    model = nn.Dense(12)
    x = jax.random.normal(jax.random.key(0), (5, 16))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=("kernel",),
                       method=lj.methods.make(method, init_weights="pissa"))
    adapters = lj.init_adapters(params, spec, jax.random.key(2))
    residual, adapters = lj.transform_base(params, adapters)
    a = adapters["kernel"]
    np.testing.assert_allclose(residual["kernel"],
                               params["kernel"] - a.scale * a.params["a"] @ a.params["b"],
                               atol=1e-6)
    np.testing.assert_allclose(lj.apply(model, residual, adapters, x),
                               model.apply({"params": params}, x), atol=1e-5)
    np.testing.assert_allclose(lj.unmerge(lj.merge(residual, adapters), adapters)["kernel"],
                               residual["kernel"], atol=1e-5)


def test_with_params_builds_adapters_from_user_arrays():
    model, x, targets = CASES["toy"]
    params, adapters = _setup(model, x, targets)
    trainable, _ = lj.split(adapters)
    mine = jax.tree.map(lambda a: {k: jnp.full_like(v, 0.5) for k, v in a.params.items()},
                        trainable, is_leaf=lj.methods.is_adapter)
    built = lj.with_params(adapters, mine)
    assert all(float(jnp.min(v)) == 0.5 for v in jax.tree.leaves(lj.split(built)[0]))
    bad = jax.tree.map(lambda a: {k: jnp.ones(v.shape + (1,)) for k, v in a.params.items()},
                       trainable, is_leaf=lj.methods.is_adapter)
    with pytest.raises(ValueError, match="has shape"):
        lj.with_params(adapters, bad)


def test_method_arguments_are_typed_and_checked():
    with pytest.raises(TypeError, match="did you mean 'init_weights'"):
        lj.methods.make("lora", init_weight="pissa")
    with pytest.raises(TypeError, match="must be float"):
        lj.methods.lora(lora_plus_ratio="16")
    with pytest.raises(ValueError, match="unknown init_weights"):
        lj.methods.dora(init_weights="svd")
    with pytest.raises(ValueError, match="did you mean 'dora'"):
        lj.LoraSpec(method="doro")
    with pytest.raises(ValueError, match="reserved for full fine-tuning"):
        lj.methods.register("full", lj.methods.LoRA)


def test_modules_to_save_keeps_a_tiny_delta_over_a_bf16_base():
    model = nn.Dense(4, param_dtype=jnp.bfloat16)
    x = jnp.zeros((2, 3), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    params = {**params, "bias": jnp.full((4,), 4.0, jnp.bfloat16)}
    spec = lj.LoraSpec(rank=1, targets=("kernel",), modules_to_save=("bias",))
    adapters = lj.init_adapters(params, spec, jax.random.key(1))
    adapters["bias"] = dataclasses.replace(adapters["bias"], params={"w": jnp.full((4,), 1e-3)})
    y = lj.apply(model, params, adapters, x)
    np.testing.assert_allclose(y, 4.001, rtol=1e-6)  # 4 + 1e-3 rounds to 4 in bf16


@pytest.mark.parametrize("equation, h_shape, b_shape", [
    ("...R,Ro->...o", (2, 5, 3), (3, 7)),             # dense
    ("btR,Rhd->bthd", (2, 5, 3), (3, 4, 6)),          # multi-axis output (DenseGeneral)
    ("btR,Rcd->btdc", (2, 5, 3), (3, 4, 6)),          # permuted output (Einsum)
    ("ZbtR,ZRo->Zbto", (2, 3, 5, 3), (2, 3, 7)),      # a bank's per-example factors
])
def test_up_einsum_values_and_gradients_are_einsums(equation, h_shape, b_shape):
    """layers.up_einsum only reorders B's gradient contraction (for XLA:CPU's layouts)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    h, b = jax.random.normal(k1, h_shape), jax.random.normal(k2, b_shape)
    loss = lambda fn: lambda h, b: jnp.sum(jnp.sin(fn(equation, h, b)))
    want = jax.grad(loss(jnp.einsum), (0, 1))(h, b)
    got = jax.grad(loss(layers.up_einsum), (0, 1))(h, b)
    np.testing.assert_allclose(layers.up_einsum(equation, h, b), jnp.einsum(equation, h, b),
                               rtol=1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
