"""LoRA (Hu et al. 2021): ``y = x W + s · drop(x) A B``, with PEFT's inits, rsLoRA and PiSSA.

Shapes in Flax's kernel layout: A is ``(*in, r)`` and B is ``(r, *out)`` for a kernel
``(*in, *out)`` (any axis order for Einsum kernels; the layout's einsums handle it), with leading
stacked-layer axes on both when the kernel is stacked. The forward pass stays factored: it never
forms ``A B``. Inits (``init_weights``):

- ``'default'``: PEFT's: A ~ kaiming-uniform(a=√5), i.e. U(−1/√d_in, 1/√d_in); B = 0. For an
  embedding PEFT's choice is the other way round: A = 0, B ~ N(0, 1).
- ``'gaussian'``: A ~ N(0, 1/r²), B = 0.
- ``'pissa'``: top-r SVD of W = U S Vᵀ: A = U_r √(S_r/s), B = √(S_r/s) V_rᵀ, so that s·A B is
  W's principal part. The base must then become the residual: ``params, adapters =
  lj.transform_base(params, adapters)`` (residual + s·A B = W).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method


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


def delta(x, adapter: Adapter, module=None):
    """``s · x A B`` for one layer; x is the (dropped-out) layer input."""
    p, layout = adapter.params, adapter.layout
    h = layers.down(layout, x, p["a"], module)
    return adapter.scale * layers.up(layout, h, p["b"])


def weight_delta(adapter: Adapter):
    """``s · A B`` in the kernel's axis order, float32, stacked axes leading."""
    return adapter.scale * layers.product(adapter.layout, adapter.params["a"], adapter.params["b"])


def add(kernel, d):
    """``kernel + d`` in float32, cast back to the kernel's dtype."""
    return (kernel.astype(jnp.float32) + d).astype(kernel.dtype)


INITS = ("default", "gaussian", "pissa")
AXES = {"a": ("stack", "in", None), "b": ("stack", None, "out")}


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """LoRA. ``init_weights``: 'default' | 'gaussian' | 'pissa'; ``lora_plus_ratio``: LoRA+'s
    η_B/η_A (the paper suggests 16; 0 disables it), B's updates scaled after the optimizer, which
    for Adam(W) equals scaling B's learning rate."""

    name: ClassVar[str] = "lora"
    stackable: ClassVar[bool] = True
    init_weights: str = "default"
    lora_plus_ratio: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in INITS:
            raise ValueError(f"{self.name}: unknown init_weights {self.init_weights!r}; use one "
                             f"of {INITS}")
        if self.lora_plus_ratio < 0:
            raise ValueError(f"{self.name}: lora_plus_ratio must be >= 0 (0 disables LoRA+)")

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        a, b = init_factors(key, kernel, layout, rank, scale, self.init_weights)
        return Adapter({"a": a, "b": b}, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        return y + delta(x, adapter, module).astype(y.dtype)

    def merge(self, kernel, adapter):
        return add(kernel, weight_delta(adapter))

    def unmerge(self, kernel, adapter):
        return add(kernel, -weight_delta(adapter))

    def transform_base(self, kernel, adapter):
        """PiSSA: the base becomes the residual ``W − s·A B`` (exactly, for every LoRA-family
        method: the principal part moves into the factors)."""
        if self.init_weights != "pissa":
            return kernel, adapter
        return add(kernel, -weight_delta(adapter)), adapter

    def leaf_axes(self, adapter):
        return AXES

    def param_groups(self, adapter):
        return {"b": "lora_plus"} if self.lora_plus_ratio else {}

    def group_transform(self, group):
        if group != "lora_plus":
            return super().group_transform(group)
        return optax.scale(self.lora_plus_ratio)
