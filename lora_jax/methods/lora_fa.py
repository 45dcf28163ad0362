"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen at its init, ``y = x W + s · drop(x) A B``.

A ``(*stack, *in, r)`` lives in ``Adapter.state`` (no gradient, no optimizer state) and only B
``(*stack, r, *out)`` is trained (init 0). Because no gradient flows to A, the backward pass
needs only the rank-r ``x·A`` to form B's gradient, not the layer input ``x`` that LoRA keeps for
A's: the activation memory of the adapter branch shrinks from ``d_in`` to ``r`` numbers per token
and layer (``experiments/bench_lora_fa.py`` measures a whole train step). The math is LoRA's;
inits are LoRA's ``init_weights`` ('default': A ~ U(±1/√d_in), the paper's; 'gaussian';
'pissa', whose principal A then stays frozen and whose residual base comes from
``lj.transform_base``), except on an embedding, where LoRA's A = 0 would never train: there
A ~ N(0, 1) and B = 0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method
from lora_jax.methods.lora import AXES, INITS, add, init_factors


def weight_delta(adapter: Adapter):
    """``s · A B`` in the kernel's axis order, float32, stacked axes leading."""
    return adapter.scale * layers.product(adapter.layout, adapter.state["a"],
                                          adapter.params["b"])


@dataclasses.dataclass(frozen=True)
class LoRAFA(Method):
    """LoRA-FA. ``init_weights``: 'default' | 'gaussian' | 'pissa' (as LoRA's)."""

    name: ClassVar[str] = "lora_fa"
    init_weights: str = "default"

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in INITS:
            raise ValueError(f"{self.name}: unknown init_weights {self.init_weights!r}; use one "
                             f"of {INITS}")

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        if layout.kind == "embed" and self.init_weights != "pissa":  # LoRA's A = 0 never trains
            stack = kernel.shape[: layout.n_stack]
            a = jax.random.normal(key, stack + layout.in_shape + (rank,))
            b = jnp.zeros(stack + (rank,) + layout.out_shape)
        else:
            a, b = init_factors(key, kernel, layout, rank, scale, self.init_weights)
        return Adapter({"b": b}, {"a": a}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        h = layers.down(adapter.layout, x, adapter.state["a"], module)
        d = adapter.scale * layers.up(adapter.layout, h, adapter.params["b"])
        return y + d.astype(y.dtype)

    def merge(self, kernel, adapter):
        return add(kernel, weight_delta(adapter))

    def unmerge(self, kernel, adapter):
        return add(kernel, -weight_delta(adapter))

    def transform_base(self, kernel, adapter):
        """PiSSA: the base becomes the residual ``W − s·A B`` (exactly)."""
        if self.init_weights != "pissa":
            return kernel, adapter
        return add(kernel, -weight_delta(adapter)), adapter

    def leaf_axes(self, adapter):
        return AXES
