"""Token-level losses for language-model training that avoid materialising the full logits.

`chunked_softmax_cross_entropy` computes the mean next-token cross-entropy of
``logits = hidden @ table.T`` (a tied or untied LM head over a large vocabulary, e.g. GPT-2's
50,257) a chunk of tokens at a time, in float32, and never holds the (tokens, vocab) logits or
their gradient for more than one chunk: the forward keeps only each token's log-sum-exp, and the
backward recomputes each chunk's logits (one more head matmul) to form ``softmax - onehot``. It
equals ``optax.softmax_cross_entropy_with_integer_labels(hidden @ table.T, labels).mean()`` in
value and gradient (tests/test_losses.py). Nothing here knows about models or the trainer; wiring
it in means having the model return its final hidden states and head table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(n, ...) -> (n / chunk, chunk, ...)."""
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _chunk_stats(h: jax.Array, table: jax.Array, labels: jax.Array):
    """Per-token (log-sum-exp, label logit) of one chunk: h (c, d), table (V, d), labels (c,)."""
    logits = jnp.einsum("cd,vd->cv", h, table, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return lse, picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_xent(h: jax.Array, table: jax.Array, labels: jax.Array, chunk: int,
                  table_grad: bool) -> jax.Array:
    return _fwd(h, table, labels, chunk, table_grad)[0]


def _fwd(h, table, labels, chunk, table_grad):
    del table_grad
    lse, picked = jax.lax.map(lambda a: _chunk_stats(a[0], table, a[1]),
                              (_chunks(h, chunk), _chunks(labels, chunk)))
    return jnp.mean(lse - picked), (h, table, labels, lse)


def _bwd(chunk, table_grad, res, g):
    h, table, labels, lse = res
    scale = g / h.shape[0]

    def one(carry, xs):
        hc, lc, lsec = xs
        logits = jnp.einsum("cd,vd->cv", hc, table, preferred_element_type=jnp.float32)
        p = jnp.exp(logits - lsec[:, None])
        p = p - jax.nn.one_hot(lc, table.shape[0], dtype=p.dtype)
        p = p * scale
        dh = jnp.einsum("cv,vd->cd", p, table.astype(jnp.float32)).astype(h.dtype)
        if table_grad:  # a loop carry XLA cannot drop, so skipped outright for a frozen table
            carry = carry + jnp.einsum("cv,cd->vd", p, hc.astype(jnp.float32))
        return carry, dh

    dtable, dh = jax.lax.scan(one, jnp.zeros(table.shape if table_grad else (), jnp.float32),
                              (_chunks(h, chunk), _chunks(labels, chunk), lse))
    dtable = dtable if table_grad else jnp.zeros(table.shape, jnp.float32)
    return dh.reshape(h.shape), dtable.astype(table.dtype), None


_chunked_xent.defvjp(_fwd, _bwd)


def chunked_softmax_cross_entropy(hidden: jax.Array, table: jax.Array, labels: jax.Array,
                                  chunk_size: int = 128, table_grad: bool = True) -> jax.Array:
    """Mean cross-entropy of ``hidden @ table.T`` against integer labels, a chunk at a time.

    Args:
      hidden: (..., d) final hidden states (any float dtype; logits are accumulated in float32).
      table: (V, d) LM-head table (GPT-2's tied ``wte`` embedding; an untied Dense kernel (d, V)
        is passed as ``kernel.T``).
      labels: (...) int next-token ids in [0, V), same leading shape as ``hidden``.
      chunk_size: tokens per chunk; must divide the number of tokens (prod of leading axes).
      table_grad: False for a frozen table (LoRA): its gradient is then zeros and never computed
        (the chunk loop's accumulator would otherwise survive XLA's dead-code elimination).
    Returns:
      () float32 mean loss; differentiable in ``hidden`` (and in ``table`` with table_grad).

    Example:
      >>> loss = chunked_softmax_cross_entropy(h[:, :-1], params["wte"]["embedding"], tokens[:, 1:])
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden has leading shape {hidden.shape[:-1]} but labels {labels.shape}; "
                         "pass the hidden states of the positions the labels predict.")
    if table.ndim != 2 or table.shape[1] != hidden.shape[-1]:
        raise ValueError(f"table has shape {table.shape}; expected (vocab, {hidden.shape[-1]}). "
                         "For a Dense LM head pass kernel.T.")
    n = labels.size
    if chunk_size <= 0 or n % chunk_size:
        fits = next(c for c in (512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if n % c == 0)
        raise ValueError(f"chunk_size={chunk_size} must divide the {n} tokens; e.g. {fits}.")
    return _chunked_xent(hidden.reshape(n, hidden.shape[-1]), table, labels.reshape(n), chunk_size,
                         table_grad)
