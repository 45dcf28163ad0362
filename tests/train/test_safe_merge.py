"""``lj.merge(..., safe=True)`` (PEFT's safe_merge): a NaN in an adapter is an error naming the
kernel; finite adapters merge exactly as without the check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import lora_jax as lj


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(jnp.tanh(nn.Dense(8, name="mid")(x)))


def test_safe_merge_names_the_first_nonfinite_kernel():
    model, x = TwoDense(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=(r"(mid|out)/kernel",))
    adapters = lj.init_adapters(params, spec, jax.random.key(1),
                                layouts=lj.trace_layouts(model, params, x))
    ok = lj.merge(params, adapters, safe=True)
    jax.tree.map(np.testing.assert_array_equal, ok, lj.merge(params, adapters))
    trainable, state = lj.split(adapters)
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, a: a.at[0].set(jnp.nan) if "out" in jax.tree_util.keystr(p) else a, trainable)
    bad = lj.join(trainable, state)
    with pytest.raises(ValueError, match=r"merging the adapter into 'out/kernel' gives NaN/inf"):
        lj.merge(params, bad, safe=True)
    assert not np.isfinite(np.asarray(lj.merge(params, bad)["out"]["kernel"])).all()
