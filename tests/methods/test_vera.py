"""VeRA: PEFT's forward formula, shared and regenerated projections (never stored), PEFT's inits,
its own sharding axes for ``b``, and its config. The conformance suite covers the rest."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import sharding
from lora_jax.methods.vera import projections


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="second")(jnp.tanh(nn.Dense(6, name="first")(x)))


def _setup(method, rank=3):
    model, x = TwoDense(), jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lj.LoraSpec(rank=rank, alpha=8.0, targets=(".*/kernel",), method=method)
    return model, x, params, lj.init_adapters(params, spec, jax.random.key(2))


def test_adapters_hold_only_d_and_b_at_peft_inits():
    _, _, _, adapters = _setup(lj.methods.vera(d_initial=0.25))
    for a in jax.tree.leaves(adapters, is_leaf=lj.methods.is_adapter):
        assert set(a.params) == {"d", "b"} and a.state == {}
        np.testing.assert_array_equal(a.params["d"], np.full((3,), 0.25))
        np.testing.assert_array_equal(a.params["b"], np.zeros((6,)))


def test_forward_is_peft_formula_b_times_d_xa_b():
    model, x, params, adapters = _setup(lj.methods.vera(seed=7))
    first = adapters["first"]["kernel"]
    d, b = jnp.array([0.5, -1.0, 2.0]), jnp.linspace(-1, 1, 6)
    adapters = lj.with_params(adapters, {"first": {"kernel": {"d": d, "b": b}},
                                         "second": {"kernel": adapters["second"]["kernel"].params}})
    a_mat, b_mat = projections(7, first.layout, 3)
    delta = b * ((d * (x @ a_mat)) @ b_mat)  # no alpha scale, as in PEFT
    h = jnp.tanh(x @ params["first"]["kernel"] + params["first"]["bias"] + delta)
    want = h @ params["second"]["kernel"] + params["second"]["bias"]
    np.testing.assert_allclose(lj.apply(model, params, adapters, x), want, atol=1e-5)
    assert float(jnp.max(jnp.abs(want - model.apply({"params": params}, x)))) > 1e-2


def test_projections_are_kaiming_uniform_shared_by_shape_and_seeded():
    _, _, _, adapters = _setup(lj.methods.vera())
    la, lb = adapters["first"]["kernel"].layout, adapters["second"]["kernel"].layout
    a1, b1 = projections(0, la, 16)
    a2, b2 = projections(0, lb, 16)  # same shape, another layer: the same matrices
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    a3, _ = projections(1, la, 16)
    assert not np.allclose(a1, a3), "the seed does not change the projections"
    # kaiming-uniform(a=√5): U(±1/√fan_in), A's fan_in = d_in = 6, B's = r = 16.
    for m, bound in ((a1, 1 / np.sqrt(6)), (b1, 1 / np.sqrt(16))):
        assert np.max(np.abs(m)) <= bound and np.max(np.abs(m)) > 0.8 * bound
        assert abs(float(np.std(m)) - bound / np.sqrt(3)) < 0.25 * bound / np.sqrt(3)


def test_stacked_b_takes_the_output_axes_and_d_the_stack():
    layout = lj.Layout("dense", (8,), (4,), (8, 4), n_stack=1)
    a = lj.methods.vera().init(None, jnp.zeros((3, 8, 4)), layout, 2, 1.0, 0.0)
    names = sharding.adapter_logical_specs(a, ("layers", "embed", "mlp"))
    assert names.params == {"d": ("layers", None), "b": ("layers", "mlp")}


def test_unknown_argument_raises_and_the_config_builds_the_method():
    with pytest.raises(TypeError, match="did you mean 'seed'"):
        lj.methods.make("vera", sed=1)
    config = importlib.import_module("configs.vera").get_config("small")
    method = lj.methods.from_config(config.method, config.method_args.to_dict())
    assert method == lj.methods.vera() and config.adapter.rank == 64
