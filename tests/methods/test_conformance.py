"""The conformance suite: every registered method (built-in or added later with
``lj.methods.register``) passes the same checks on a tiny GPT-2, scanned and unscanned:

identity init => base outputs; factored == merged (per task for routing methods); unmerge(merge) ==
base; gradients reach only trainable leaves; a round trip through ``lora_jax.io``; the 8-device
``fsdp_tp`` mesh gives the 1-device losses. A method's test arguments (e.g. MTL's ``num_tasks``)
come from its ``example_args`` class attribute; a method that needs none declares nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax import io, models, sharding
from lora_jax.train import make_train_step, token_loss
from lora_jax.train.config import MeshConfig

TINY = dict(d_model=32, n_layers=2, n_head=2, n_positions=16, vocab_size=64)
NUM_TASKS = 3  # what a routing method's example_args should use
INTERNAL = {"saved", "bank"}  # built from other adapters: tests/test_transform.py, test_bank.py


def registered() -> list[str]:
    return [m for m in lj.methods.known() if m not in INTERNAL]


def build(name: str) -> lj.Method:
    factory = lj.methods._factory(name)
    return lj.methods.make(name, **getattr(factory, "example_args", {}))


def routes(method: lj.Method) -> bool:
    return type(method).merge_task is not lj.Method.merge_task


def setup(name: str, scan: bool = False, rank: int = 4):
    model, _ = models.get_model("gpt2", "tiny", scan_layers=scan, **TINY)
    x = jax.random.randint(jax.random.key(0), (4, 8), 0, TINY["vocab_size"])
    params = lj.transform._unbox(model.init(jax.random.key(1), x)["params"])
    layouts = lj.trace_layouts(model, params, x)
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("all-linear",), method=build(name))
    adapters = lj.init_adapters(params, spec, jax.random.key(2), layouts=layouts)
    params, adapters = lj.transform_base(params, adapters)
    task_ids = jnp.arange(4) % NUM_TASKS if routes(spec.method) else None
    return model, x, params, adapters, task_ids


def randomize(adapters, seed: int = 3):
    """Every trainable leaf perturbed, so each adapter changes its layer."""
    trainable, state = lj.split(adapters)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.02 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return lj.join(jax.tree.unflatten(tree, leaves), state)


def forward(model, params, adapters, x, task_ids):
    return lj.apply(model, params, adapters, x, task_ids=task_ids)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("name", registered())
def test_identity_factored_merged_unmerged(name, scan):
    model, x, params, adapters, task_ids = setup(name, scan)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(forward(model, params, adapters, x, task_ids), base, atol=1e-5)
    adapters = randomize(adapters)
    factored = forward(model, params, adapters, x, task_ids)
    assert float(jnp.max(jnp.abs(factored - base))) > 1e-3, "the adapters change nothing"
    tasks = range(NUM_TASKS) if task_ids is not None else [None]
    for t in tasks:
        merged = lj.merge(params, adapters, task=t)
        rows = np.arange(4) if t is None else np.asarray(task_ids == t)
        np.testing.assert_allclose(model.apply({"params": merged}, x)[rows], factored[rows],
                                   atol=1e-4)
        back = lj.unmerge(merged, adapters, task=t)
        for p, q in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_allclose(p, q, atol=1e-4)


@pytest.mark.parametrize("name", registered())
def test_gradients_reach_only_trainable_leaves_and_io_round_trips(name, tmp_path):
    model, x, params, adapters, task_ids = setup(name)
    adapters = randomize(adapters)
    trainable, state = lj.split(adapters)
    loss = lambda t: jnp.mean(forward(model, params, lj.join(t, state), x, task_ids) ** 2)
    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    tx = lj.adapter_optimizer(optax.sgd(0.1), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    labels = lj.adapter_labels(trainable)
    for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
        if label == "frozen":
            assert not np.any(np.asarray(u))
    io.save_adapters(tmp_path, adapters)
    loaded, _ = io.load_adapters(tmp_path, params)
    np.testing.assert_allclose(forward(model, params, loaded, x, task_ids),
                               forward(model, params, adapters, x, task_ids), atol=1e-6)


def _losses(name: str, mesh_cfg: MeshConfig | None, steps: int = 3) -> np.ndarray:
    model, x, params, adapters, task_ids = setup(name)
    trainable, state = lj.split(adapters)
    frozen = {"params": params, "state": state}
    tx = lj.adapter_optimizer(optax.adam(1e-2), trainable)

    def loss_fn(t, f, batch, rng):
        logits = lj.apply(model, f["params"], lj.join(t, f["state"]), batch["inputs"],
                          task_ids=batch["task_ids"])
        return token_loss(logits, batch)[0] + lj.regularizer(lj.join(t, f["state"]))

    batch = {"inputs": x, "targets": jnp.roll(x, -1, axis=1), "loss_mask": jnp.ones(x.shape),
             "task_ids": jnp.arange(4) % NUM_TASKS}
    sh = None
    if mesh_cfg is not None:
        mesh = sharding.make_mesh(mesh_cfg)
        specs = sharding.param_logical_specs(model, x)
        sh = sharding.train_shardings(mesh, sharding.logical_rules(mesh_cfg), specs, trainable,
                                      frozen, tx)
        trainable, frozen = sharding.put((trainable, frozen), (sh.trainable, sh.frozen))
        batch = sharding.shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    step = make_train_step(loss_fn, tx, sh)
    opt_state = tx.init(trainable)
    if sh is not None:  # as the trainer does: optimizer state placed like its parameters
        opt_state = sharding.put(opt_state, sh.opt_state)
    out = []
    for i in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch,
                                             jax.random.key(i))
        out.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", registered())
def test_8_device_fsdp_tp_mesh_gives_1_device_losses(name):
    one = _losses(name, None)
    eight = _losses(name, MeshConfig(preset="fsdp_tp"))
    assert np.all(np.isfinite(one)) and one[-1] < one[0]
    np.testing.assert_allclose(eight, one, rtol=2e-5)


def test_a_user_method_registered_from_outside_is_covered():
    """A method defined here, outside lora_jax, is built by name and passes the math checks."""

    @dataclasses.dataclass(frozen=True)
    class Halved(lj.methods.LoRA):
        name = "halved_test_only"

        def output(self, y, x, adapter, kernel, bias, module, ctx):
            return super().output(y, x, dataclasses.replace(adapter, scale=adapter.scale / 2),
                                  kernel, bias, module, ctx)

        def merge(self, kernel, adapter):
            return super().merge(kernel, dataclasses.replace(adapter, scale=adapter.scale / 2))

        def unmerge(self, kernel, adapter):
            return super().unmerge(kernel, dataclasses.replace(adapter, scale=adapter.scale / 2))

    lj.methods.register("halved_test_only", Halved)
    try:
        assert lj.methods.make("halved_test_only") == Halved()
        test_identity_factored_merged_unmerged("halved_test_only", False)
        with pytest.raises(TypeError, match="did you mean 'init_weights'"):
            lj.methods.make("halved_test_only", init_weight="pissa")
    finally:
        del lj.methods._REGISTRY["halved_test_only"]
