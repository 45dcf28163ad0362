"""MTL-LoRA: per-example task routing, per-task merge, reduction to LoRA, gradient isolation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import ConvNet, PermutedToy, Stack

import lora_jax as lj
from lora_jax import rules

T = 3


B = 6
IDS = jax.random.randint(jax.random.key(3), (B, 5), 0, 50)
IMG = jax.random.normal(jax.random.key(4), (B, 8, 8, 3))
SEQ = jax.random.normal(jax.random.key(5), (B, 4, 16))
TASKS = jnp.array([0, 1, 2, 1, 0, 2])
CASES = {
    "toy": (PermutedToy(), IDS, (r"embed/embedding", r"(query|out|ein|head)/kernel")),
    "conv": (ConvNet(), IMG, (r"(conv|head)/kernel",)),
    "scan": (Stack(), SEQ, (r"blocks/(up|down)/kernel",)),
}


@functools.cache
def _base_params(case):
    model, x, _ = CASES[case]
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return params, lj.trace_layouts(model, params, x)


def _setup(case, **options):
    model, x, targets = CASES[case]
    params, layouts = _base_params(case)
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=targets,
                       method=lj.methods.mtl(num_tasks=T, **options))
    return model, x, params, lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)


def _randomize(adapters, seed=2):
    """Non-zero everything: random A, B_i, mixing logits and Λ_t = I + noise."""
    paths_leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                     for k, (_, l) in zip(keys, paths_leaves)])


@functools.cache
def _forward(model):
    """Jitted routed forward, compiled once per model (and adapter structure)."""
    return jax.jit(lambda p, a, x, t: lj.apply(model, p, a, x, task_ids=t))


@functools.cache
def _base(model):
    """Jitted plain forward (base or merged parameters)."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_init_is_base(case):
    model, x, params, adapters = _setup(case)
    np.testing.assert_allclose(_forward(model)(params, adapters, x, TASKS),
                               _base(model)(params, x), atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_per_task_equals_routed_forward(case):
    model, x, params, adapters = _setup(case)
    adapters = _randomize(adapters)
    mixed = _forward(model)(params, adapters, x, TASKS)
    base = _base(model)(params, x)
    assert np.abs(mixed - base).max() > 1e-2  # the adapters do something
    for t in range(T):
        merged = _base(model)(lj.merge(params, adapters, task=t), x)
        rows = np.asarray(TASKS) == t
        np.testing.assert_allclose(mixed[rows], merged[rows], atol=3e-5, rtol=1e-5)
        back = lj.unmerge(lj.merge(params, adapters, task=t), adapters, task=t)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), back, params)


def test_mixed_batch_equals_single_task_batches():
    model, x, params, adapters = _setup("toy")
    adapters = _randomize(adapters)
    fwd = _forward(model)
    mixed = fwd(params, adapters, x, TASKS)
    for t in range(T):
        alone = fwd(params, adapters, x, jnp.full((B,), t))
        rows = np.asarray(TASKS) == t
        np.testing.assert_allclose(mixed[rows], alone[rows], atol=1e-5)
        assert not np.allclose(mixed[~rows], alone[~rows], atol=1e-3)  # tasks do differ


def test_infinite_temperature_identity_lambda_is_lora_with_mean_b():
    model, x, params, adapters = _setup("toy", temperature=1e9)
    rand = _randomize(adapters)
    # Keep Λ_t = I, randomise A, B_i and the (now irrelevant) mixing logits.
    adapters = jax.tree.map(
        lambda r, a: dataclasses.replace(r, params={**r.params, "lam": a.params["lam"]}),
        rand, adapters, is_leaf=lj.methods.is_adapter)
    as_lora = jax.tree.map(
        lambda a: dataclasses.replace(a, method=lj.methods.lora(), params={
            "a": a.params["a"], "b": a.params["b"].mean(axis=-len(a.layout.out_shape) - 2)}),
        adapters, is_leaf=lj.methods.is_adapter)
    np.testing.assert_allclose(_forward(model)(params, adapters, x, TASKS),
                               jax.jit(lambda p, a: lj.apply(model, p, a, x))(params, as_lora),
                               atol=1e-5)


def test_gradients_reach_lambda_and_mix_only_through_their_task():
    model, x, params, adapters = _setup("toy")
    adapters = _randomize(adapters)

    def loss(adapters, tasks):
        return jnp.sum(lj.apply(model, params, adapters, x, task_ids=tasks) ** 2)

    grads = jax.jit(jax.grad(loss))(adapters, jnp.zeros((B,), jnp.int32))
    for path, g in rules.flatten(grads).items():
        for name in ("lam", "w"):
            assert np.abs(g.params[name][0]).max() > 0, (path, name)
            assert not np.any(g.params[name][1:]), (path, name)
        assert np.abs(g.params["a"]).max() > 0 and np.abs(g.params["b"]).max() > 0


def test_diagonal_option_and_shapes():
    _, _, _, adapters = _setup("toy", diagonal=True, num_up=4)
    q = adapters["query"]["kernel"].params
    assert q["a"].shape == (16, 2) and q["b"].shape == (4, 2, 2, 4)
    assert q["lam"].shape == (T, 2) and q["w"].shape == (T, 4)
    np.testing.assert_array_equal(q["lam"], 1.0)
    _, _, _, full = _setup("toy")
    np.testing.assert_array_equal(full["query"]["kernel"].params["lam"],
                                  np.broadcast_to(np.eye(2), (T, 2, 2)))
    _, _, _, scan = _setup("scan", diagonal=True)
    up = scan["blocks"]["up"]["kernel"].params
    assert {k: v.shape for k, v in up.items()} == {
        "a": (3, 16, 2), "lam": (3, T, 2), "b": (3, 3, 2, 2, 8), "w": (3, T, 3)}


def test_diagonal_forward_matches_merge():
    model, x, params, adapters = _setup("scan", diagonal=True)
    adapters = _randomize(adapters)
    y = _forward(model)(params, adapters, x, TASKS)
    merged = _base(model)(lj.merge(params, adapters, task=1), x)
    rows = np.asarray(TASKS) == 1
    np.testing.assert_allclose(y[rows], merged[rows], atol=3e-5)


def test_mix_inits():
    _, _, _, kaiming = _setup("toy", num_up=4)
    w = kaiming["head"]["kernel"].params["w"]
    # torch kaiming_uniform_(a=√5) on a (T, n) table: fan_in = n, bound 1/√n.
    assert np.abs(w).max() <= 0.5 and np.abs(w).max() > 0.1
    _, _, _, uniform = _setup("toy", mix_init="uniform")
    assert not np.any(uniform["head"]["kernel"].params["w"])
    assert uniform["head"]["kernel"].method.temperature == 0.1


# ----------------------------------------------------------------------------- errors


def test_out_of_range_task_id_raises_eagerly_and_poisons_rows_under_jit():
    model, x, params, adapters = _setup("toy")
    adapters = _randomize(adapters)
    bad = jnp.array([0, 1, 3, 1, -1, 2])
    with pytest.raises(ValueError, match=r"task ids \[-1, 3\] outside \[0, 3\)"):
        lj.apply(model, params, adapters, x, task_ids=bad)
    y = np.asarray(_forward(model)(params, adapters, x, bad))
    poisoned = np.isnan(y).reshape(B, -1)
    assert poisoned[[2, 4]].all() and not poisoned[[0, 1, 3, 5]].any()
    good = np.asarray(_forward(model)(params, adapters, x, TASKS))
    np.testing.assert_allclose(y[[0, 1, 3, 5]], good[[0, 1, 3, 5]], atol=1e-6)


def test_missing_or_misshapen_task_ids():
    model, x, params, adapters = _setup("toy")
    with pytest.raises(ValueError, match=r"needs task_ids: lj.apply\(..., task_ids=...\)"):
        lj.apply(model, params, adapters, x)
    with pytest.raises(ValueError, match="shape"):
        lj.apply(model, params, adapters, x, task_ids=jnp.zeros((B + 1,), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        lj.apply(model, params, adapters, x, task_ids=jnp.zeros((B,)))


def test_num_tasks_is_required():
    params = {"l": {"kernel": jnp.ones((8, 8))}}
    with pytest.raises(ValueError, match="num_tasks"):
        lj.init_adapters(params, lj.LoraSpec(rank=2, targets=("l/kernel",), method="mtl"),
                         jax.random.key(0))


def test_plain_merge_asks_for_a_task():
    _, _, params, adapters = _setup("toy")
    with pytest.raises(ValueError, match=r"lj.merge\(params, adapters, task=task\)"):
        lj.merge(params, adapters)
    with pytest.raises(ValueError, match="outside"):
        lj.merge(params, adapters, task=T)
