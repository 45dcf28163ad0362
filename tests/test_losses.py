"""chunked_softmax_cross_entropy equals the plain softmax cross-entropy in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.losses import chunked_softmax_cross_entropy


def _plain(h, table, labels):
    logits = jnp.einsum("...d,vd->...v", h, table)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _case(seed=0, b=2, t=12, d=16, v=1003):
    kh, ke, kl = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kh, (b, t, d)), 0.5 * jax.random.normal(ke, (v, d)),
            jax.random.randint(kl, (b, t), 0, v))


@pytest.mark.parametrize("chunk", [1, 8, 24])
def test_value_and_gradients_equal_plain(chunk):
    h, table, labels = _case()
    want, (gh, gt) = jax.value_and_grad(_plain, argnums=(0, 1))(h, table, labels)
    got, (ch, ct) = jax.jit(jax.value_and_grad(chunked_softmax_cross_entropy, argnums=(0, 1)),
                            static_argnums=3)(h, table, labels, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(ch, gh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ct, gt, rtol=1e-4, atol=1e-6)


def test_bf16_hidden_accumulates_in_float32():
    h, table, labels = _case(1)
    hb, tb = h.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    got = chunked_softmax_cross_entropy(hb, tb, labels, 8)
    want = _plain(h.astype(jnp.bfloat16).astype(jnp.float32),
                  table.astype(jnp.bfloat16).astype(jnp.float32), labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-3)
    grad = jax.grad(chunked_softmax_cross_entropy)(h.astype(jnp.bfloat16),
                                                   table.astype(jnp.bfloat16), labels, 8)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_bad_inputs_name_the_fix():
    h, table, labels = _case()
    with pytest.raises(ValueError, match="chunk_size=5 must divide the 24 tokens"):
        chunked_softmax_cross_entropy(h, table, labels, 5)
    with pytest.raises(ValueError, match="kernel.T"):
        chunked_softmax_cross_entropy(h, table.T, labels, 8)
    with pytest.raises(ValueError, match="labels"):
        chunked_softmax_cross_entropy(h, table, labels[:, 1:], 8)


def test_frozen_table_gives_the_same_hidden_gradient_and_zero_table_gradient():
    h, table, labels = _case(2)
    gh, gt = jax.grad(_plain, argnums=(0, 1))(h, table, labels)
    fh, ft = jax.grad(chunked_softmax_cross_entropy, argnums=(0, 1))(h, table, labels, 8, False)
    np.testing.assert_allclose(fh, gh, rtol=1e-4, atol=1e-6)
    assert not bool(jnp.any(ft)) and bool(jnp.any(gt))
