"""int8 storage: error bound, scale layouts, stacking, slicing, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.quant import Int8Array, int8_dequantize, int8_quantize


def gaussian(shape, seed=0):
    return 0.02 * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def broadcast_scale(q):
    """The scale of every element of q, shape q.shape."""
    ax = q.codes.ndim + q.axis
    return jnp.broadcast_to(jnp.repeat(q.scale, q.block_size, axis=ax), q.shape)


@pytest.mark.parametrize("block_size,scale_shape", [(None, (1, 96)), (32, (4, 96))])
def test_round_trip_error_at_most_half_a_step(block_size, scale_shape):
    w = gaussian((128, 96))
    q = int8_quantize(w, block_size=block_size)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.scale.shape == scale_shape
    err = jnp.abs(int8_dequantize(q) - w)
    assert bool(jnp.all(err <= broadcast_scale(q) / 2 * (1 + 1e-4)))  # measured max 0.50001 * scale
    assert int(jnp.max(jnp.abs(q.codes.astype(jnp.int32)))) == 127


def test_per_channel_over_several_input_axes():
    w = gaussian((8, 16, 32))  # (heads, head_dim, d_model): two input axes
    q = int8_quantize(w, n_in=2)
    assert q.scale.shape == (1, 1, 32)
    np.testing.assert_allclose(q.scale[0, 0], jnp.max(jnp.abs(w), axis=(0, 1)) / 127, rtol=1e-6)
    assert float(jnp.max(jnp.abs(int8_dequantize(q) - w) / q.scale)) <= 0.5 + 1e-4


def test_stack_slices_and_jit():
    w = gaussian((3, 64, 48))
    q = int8_quantize(w, n_stack=1, block_size=16)
    assert q.scale.shape == (3, 4, 48)
    full = int8_dequantize(q)
    for i in range(3):
        qi = int8_quantize(w[i], block_size=16)
        np.testing.assert_array_equal(q.codes[i], qi.codes)
        np.testing.assert_array_equal(q.scale[i], qi.scale)
        sliced = jax.tree.map(lambda x: x[i], q)
        assert isinstance(sliced, Int8Array) and sliced.block_size == 16
        np.testing.assert_array_equal(int8_dequantize(sliced), full[i])
    np.testing.assert_array_equal(jax.jit(int8_dequantize, static_argnames="dtype")(q), full)


def test_bad_block_size_raises():
    with pytest.raises(ValueError, match=r"\(64, 8\).*block_size=48"):
        int8_quantize(jnp.ones((64, 8)), block_size=48)
