"""Multi-task baselines: per-task LoRA routes each example to its task's LoRA only; MultiLoRA with
n = 1 is LoRA; forward equals merge wherever a merge is defined; the trainer plumbs the options."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toys import ConvNet, PermutedToy, Stack

import lora_jax as lj
from lora_jax import rules
from lora_jax.methods import multi
from lora_jax.train import Experiment, trainer

T = 3


B = 6
TASKS = jnp.array([0, 1, 2, 1, 0, 2])
CASES = {
    "toy": (PermutedToy(), jax.random.randint(jax.random.key(3), (B, 5), 0, 50),
            (r"embed/embedding", r"(query|out|ein|head)/kernel")),
    "conv": (ConvNet(), jax.random.normal(jax.random.key(4), (B, 8, 8, 3)),
             (r"(conv|head)/kernel",)),
    "scan": (Stack(), jax.random.normal(jax.random.key(5), (B, 4, 16)),
             (r"blocks/(up|down)/kernel",)),
}


@functools.cache
def _base_params(case):
    model, x, _ = CASES[case]
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return params, lj.trace_layouts(model, params, x)


def _setup(case, method, rank=2, **options):
    model, x, targets = CASES[case]
    params, layouts = _base_params(case)
    spec = lj.LoraSpec(rank=rank, alpha=4.0, targets=targets,
                       method=lj.methods.make(method, **options))
    return model, x, params, lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)


def _randomize(adapters, seed=2):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape)
                                     for k, l in zip(keys, leaves)])


@functools.cache
def _forward(model):
    return jax.jit(lambda p, a, x, t: lj.apply(model, p, a, x, task_ids=t))


@functools.cache
def _base(model):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


# ----------------------------------------------------------------------------- per_task


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_task_zero_init_is_base_and_merge_per_task_equals_routed_forward(case):
    model, x, params, adapters = _setup(case, "per_task", num_tasks=T)
    np.testing.assert_allclose(_forward(model)(params, adapters, x, TASKS),
                               _base(model)(params, x), atol=1e-6)
    adapters = _randomize(adapters)
    mixed = _forward(model)(params, adapters, x, TASKS)
    assert np.abs(mixed - _base(model)(params, x)).max() > 1e-2
    for t in range(T):
        merged = lj.merge(params, adapters, task=t)
        rows = np.asarray(TASKS) == t
        np.testing.assert_allclose(mixed[rows], _base(model)(merged, x)[rows], atol=3e-5,
                                   rtol=1e-5)
        back = lj.unmerge(merged, adapters, task=t)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), back, params)


def _only_task(adapters, t, other):
    """``other``'s per-task LoRAs, except task ``t``'s, which is ``adapters``'."""
    def swap(a, o):
        n = a.layout.n_stack
        keep = lambda u, v: jnp.moveaxis(jnp.moveaxis(v, n, 0).at[t].set(jnp.moveaxis(u, n, 0)[t]),
                                         0, n)
        return dataclasses.replace(a, params=jax.tree.map(keep, a.params, o.params))
    return jax.tree.map(swap, adapters, other, is_leaf=lj.methods.is_adapter)


@pytest.mark.parametrize("case", ["toy", "scan"])
def test_per_task_output_depends_only_on_its_tasks_adapter(case):
    model, x, params, adapters = _setup(case, "per_task", num_tasks=T)
    one, two = _randomize(adapters, 2), _randomize(adapters, 7)
    fwd = _forward(model)
    for t in range(T):
        # Changing every other task's LoRA leaves task t's rows exactly as they were ...
        rows = np.asarray(TASKS) == t
        y = fwd(params, _only_task(one, t, two), x, TASKS)
        np.testing.assert_array_equal(y[rows], fwd(params, one, x, TASKS)[rows])
        assert not np.allclose(y[~rows], fwd(params, one, x, TASKS)[~rows], atol=1e-3)
    # ... and gradients from task 0's rows reach only LoRA 0.
    grads = jax.jit(jax.grad(lambda a: jnp.sum(lj.apply(model, params, a, x, task_ids=TASKS)[
        np.asarray(TASKS) == 0] ** 2)))(one)
    for path, g in rules.flatten(grads).items():
        n = g.layout.n_stack
        for name, leaf in g.params.items():
            leaf = np.moveaxis(np.asarray(leaf), n, 0)
            assert np.abs(leaf[0]).max() > 0 and not leaf[1:].any(), (path, name)


def test_per_task_shapes_errors_and_plain_merge():
    _, _, params, adapters = _setup("scan", "per_task", num_tasks=T)
    up = adapters["blocks"]["up"]["kernel"].params
    assert {k: v.shape for k, v in up.items()} == {"a": (3, T, 16, 2), "b": (3, T, 2, 2, 8)}
    model, x, params, adapters = _setup("toy", "per_task", num_tasks=T)
    with pytest.raises(ValueError, match=r"task ids \[3\] outside \[0, 3\)"):
        lj.apply(model, params, adapters, x, task_ids=jnp.array([0, 1, 3, 1, 0, 2]))
    with pytest.raises(ValueError, match="needs task_ids"):
        lj.apply(model, params, adapters, x)
    with pytest.raises(ValueError, match=r"lj.merge\(params, adapters, task=task\)"):
        lj.merge(params, adapters)
    with pytest.raises(ValueError, match="num_tasks"):
        _setup("toy", "per_task")
    y = np.asarray(_forward(model)(params, _randomize(adapters), x, jnp.array([0, 1, 3, 1, 0, 2])))
    assert np.isnan(y[2]).all() and not np.isnan(y[[0, 1, 3, 4, 5]]).any()


# ----------------------------------------------------------------------------- multilora


@pytest.mark.parametrize("case", sorted(CASES))
def test_multilora_zero_init_is_base_and_forward_equals_merge(case):
    model, x, params, adapters = _setup(case, "multilora", num_loras=3)
    np.testing.assert_allclose(_forward(model)(params, adapters, x, None),
                               _base(model)(params, x), atol=1e-6)
    adapters = _randomize(adapters)
    y = _forward(model)(params, adapters, x, None)
    assert np.abs(y - _base(model)(params, x)).max() > 1e-2
    merged = lj.merge(params, adapters)
    np.testing.assert_allclose(y, _base(model)(merged, x), atol=3e-5, rtol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5),
                 lj.unmerge(merged, adapters), params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_multilora_with_one_module_and_unit_scaling_is_lora(case):
    model, x, params, adapters = _setup(case, "multilora", num_loras=1)
    adapters = _randomize(adapters)

    def as_lora(a):
        n = a.layout.n_stack
        return dataclasses.replace(a, method=lj.methods.lora(), params={
            "a": jnp.squeeze(a.params["a"], n), "b": jnp.squeeze(a.params["b"], n)})

    unit = jax.tree.map(lambda a: dataclasses.replace(
        a, params={**a.params, "lam": jnp.ones_like(a.params["lam"])}), adapters,
        is_leaf=lj.methods.is_adapter)
    lora = jax.tree.map(as_lora, unit, is_leaf=lj.methods.is_adapter)
    np.testing.assert_allclose(_forward(model)(params, unit, x, None),
                               jax.jit(lambda p, a: lj.apply(model, p, a, x))(params, lora),
                               atol=1e-5)


def test_multilora_is_a_sum_of_scaled_loras_and_inits():
    model, x, params, adapters = _setup("toy", "multilora", num_loras=3)
    head = adapters["head"]["kernel"]
    assert {k: v.shape for k, v in head.params.items()} == {
        "a": (3, 24, 2), "b": (3, 2, 10), "lam": (3, 10)}
    assert not head.params["lam"].any() and head.params["b"].any()
    assert np.abs(head.params["b"]).max() <= 1 / np.sqrt(2)
    assert head.scale == 2.0  # α / r per module, no 1/n
    head = _randomize(adapters)["head"]["kernel"]
    p = head.params
    want = sum(head.scale * (p["a"][i] @ p["b"][i]) * p["lam"][i] for i in range(3))
    np.testing.assert_allclose(multi.weight_delta_multilora(head), want, atol=1e-5)


# ----------------------------------------------------------------------------- trainer plumbing


@pytest.mark.parametrize("method", ["mtl", "per_task", "multilora", "lora"])
def test_trainer_builds_the_method_from_its_args(method):
    args = dict(num_tasks=4, num_up=2, temperature=0.5, diagonal=True, num_loras=5)
    cfg = dataclasses.replace(Experiment(), method=method, method_args=args)
    built = trainer.adapter_spec(cfg).method
    assert built == {"mtl": lj.methods.mtl(num_tasks=4, num_up=2, temperature=0.5, diagonal=True),
                     "per_task": lj.methods.per_task(num_tasks=4),
                     "multilora": lj.methods.multilora(num_loras=5),
                     "lora": lj.methods.lora()}[method]
