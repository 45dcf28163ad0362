"""LoRA (Hu et al. 2021): ``y = x W + s · drop(x) A B``, with PEFT's inits, rsLoRA and PiSSA.

Shapes in Flax's kernel layout: A is ``(*in, r)`` and B is ``(r, *out)`` for a kernel
``(*in, *out)`` (any axis order for Einsum kernels; the layout's einsums handle it), with leading
stacked-layer axes on both when the kernel is stacked. The forward pass stays factored: it never
forms ``A B``. Inits (``spec.init``):

- ``'default'``: PEFT's: A ~ kaiming-uniform(a=√5), i.e. U(−1/√d_in, 1/√d_in); B = 0. For an
  embedding PEFT's choice is the other way round: A = 0, B ~ N(0, 1).
- ``'gaussian'``: A ~ N(0, 1/r²), B = 0.
- ``'pissa'``: top-r SVD of W = U S Vᵀ: A = U_r √(S_r/s), B = √(S_r/s) V_rᵀ, so that s·A B is
  W's principal part. The base must then become the residual: ``params = lj.unmerge(params,
  adapters)`` (residual + s·A B = W).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx


def init_factors(key, kernel, layout: layers.Layout, rank: int, scale: float, init: str):
    """Returns ``(a, b)`` for a (possibly stacked) kernel, in float32."""
    stack = kernel.shape[: layout.n_stack]
    a_shape = stack + layout.in_shape + (rank,)
    b_shape = stack + (rank,) + layout.out_shape
    if init == "pissa":
        return pissa_factors(kernel, layout, rank, scale)
    if layout.kind == "embed":
        return jnp.zeros(a_shape), jax.random.normal(key, b_shape)
    if init == "default":
        bound = 1.0 / math.sqrt(layout.d_in)
        a = jax.random.uniform(key, a_shape, minval=-bound, maxval=bound)
    elif init == "gaussian":
        a = jax.random.normal(key, a_shape) / rank
    else:
        raise ValueError(f"unknown init {init!r}; use 'default', 'gaussian' or 'pissa'")
    return a, jnp.zeros(b_shape)


def pissa_factors(kernel, layout: layers.Layout, rank: int, scale: float):
    """PiSSA factors from the top-``rank`` singular triplets of the kernel."""
    stack = kernel.shape[: layout.n_stack]
    w = layers.to_canonical(layout, kernel.astype(jnp.float32))
    w = w.reshape(stack + (layout.d_in, layout.d_out))
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[..., :rank] / scale)
    a = u[..., :, :rank] * root[..., None, :]
    b = root[..., :, None] * vh[..., :rank, :]
    return (a.reshape(stack + layout.in_shape + (rank,)),
            b.reshape(stack + (rank,) + layout.out_shape))


def init(key, kernel, layout, rank, scale, spec) -> Adapter:
    a, b = init_factors(key, kernel, layout, rank, scale, spec.init)
    return Adapter({"a": a, "b": b}, {}, "lora", scale, layout, spec.dropout)


def delta(x, adapter: Adapter, module=None):
    """``s · x A B`` for one layer; x is the (dropped-out) layer input."""
    p, layout = adapter.params, adapter.layout
    h = layers.down(layout, x, p["a"], module)
    return adapter.scale * layers.up(layout, h, p["b"])


def output(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    return y + delta(x, adapter, module).astype(y.dtype)


def weight_delta(adapter: Adapter):
    """``s · A B`` in the kernel's axis order, float32, stacked axes leading."""
    return adapter.scale * layers.product(adapter.layout, adapter.params["a"], adapter.params["b"])


def merge(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) + weight_delta(adapter)).astype(kernel.dtype)


def unmerge(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) - weight_delta(adapter)).astype(kernel.dtype)
