"""VeRA (Kopiczko et al., ICLR 2024): ``y = x W + (drop(x) A ⊙ d)(B ⊙ b)``, random frozen A, B.

A ``(*in, r)`` and B ``(r, *out)`` are shared by every layer of equal shape and never stored: they
are regenerated from ``(seed, shape)`` inside ``output`` and ``merge`` (``projections``), so an
adapter holds only its two trainable vectors, ``d`` ``(*stack, r)`` (init ``d_initial``, 0.1) and
``b`` ``(*stack, *out)`` (init 0, so the adapted model starts as the base). PEFT's choices: both
projections kaiming-uniform(a=√5), i.e. A ~ U(±1/√d_in) and B ~ U(±1/√r); no alpha scaling (the
adapter's ``scale`` is ignored, as PEFT's VeRA has none); the forward pass is
``y + b ⊙ ((d ⊙ drop(x) A) B)``. PEFT cuts every layer's projections out of one pair sized for
the largest layer; here each kernel shape has its own pair, so the numbers differ from PEFT's
for the same seed. Embedding and convolution kernels go through the same ``down``/``up`` as LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method
from lora_jax.methods.lora import add


def projections(seed: int, layout: layers.Layout, rank: int):
    """The shared frozen ``(A (*in, r), B (r, *out))`` of every kernel of this layout's shape.

    Deterministic in ``(seed, in_shape, out_shape, rank)``: the key folds in each size.
    """
    key = jax.random.key(seed)
    for n in (*layout.in_shape, -1, *layout.out_shape, -1, rank):
        key = jax.random.fold_in(key, n & 0xFFFFFFFF)
    ka, kb = jax.random.split(key)
    bound_a, bound_b = 1.0 / math.sqrt(layout.d_in), 1.0 / math.sqrt(rank)
    a = jax.random.uniform(ka, layout.in_shape + (rank,), minval=-bound_a, maxval=bound_a)
    b = jax.random.uniform(kb, (rank,) + layout.out_shape, minval=-bound_b, maxval=bound_b)
    return a, b


def scaled_factors(adapter: Adapter):
    """``(A ⊙ d, B ⊙ b)``: ``(*stack, *in, r)`` and ``(*stack, r, *out)``, float32."""
    layout, p = adapter.layout, adapter.params
    a, b = projections(adapter.method.seed, layout, p["d"].shape[-1])
    n = p["d"].ndim - 1  # stacked axes
    d = jnp.expand_dims(p["d"], tuple(range(n, n + len(layout.in_shape))))
    lam_b = jnp.expand_dims(p["b"], p["b"].ndim - len(layout.out_shape))
    return a * d, b * lam_b


@dataclasses.dataclass(frozen=True)
class VeRA(Method):
    """VeRA. ``seed``: the shared projections' PRNG seed (PEFT's ``projection_prng_key``);
    ``d_initial``: the initial value of every entry of ``d``."""

    name: ClassVar[str] = "vera"
    seed: int = 0
    d_initial: float = 0.1

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        del key  # nothing random is stored
        stack = kernel.shape[: layout.n_stack]
        params = {"d": jnp.full(stack + (rank,), self.d_initial, jnp.float32),
                  "b": jnp.zeros(stack + layout.out_shape, jnp.float32)}
        return Adapter(params, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        a, b = scaled_factors(adapter)
        h = layers.down(adapter.layout, x, a, module)
        return y + layers.up(adapter.layout, h, b).astype(y.dtype)

    def merge(self, kernel, adapter):
        return add(kernel, layers.product(adapter.layout, *scaled_factors(adapter)))

    def unmerge(self, kernel, adapter):
        return add(kernel, -layers.product(adapter.layout, *scaled_factors(adapter)))

    def leaf_axes(self, adapter):
        return {"d": ("stack", None), "b": ("stack", "out")}
