"""Fully trained parameters (PEFT's ``modules_to_save``), held as a delta on the base.

The adapter is ``{'w': D}`` with D of the parameter's shape, initialised to zero; the effective
parameter is ``W + D``. Keeping a delta (not a copy) makes ``unmerge`` exact and lets any
parameter (biases, norms, heads) be trained, not only intercepted kernels. Unlike PEFT's copy,
weight decay pulls D towards 0, i.e. the parameter towards its pretrained value. These adapters
are not intercepted: ``lj.apply`` adds them to the parameters before the forward pass (in float32
where the parameter is low-precision, so small deltas are not lost to rounding).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from lora_jax.methods import Adapter, Method


@dataclasses.dataclass(frozen=True)
class Saved(Method):
    """A parameter trained fully, as a delta (``LoraSpec.modules_to_save``)."""

    name: ClassVar[str] = "saved"

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        del key, rank, scale, dropout
        return Adapter({"w": jnp.zeros(kernel.shape, jnp.float32)}, {}, self, 1.0, layout)

    def output(self, y, x, adapter, kernel, bias, module, ctx):
        raise AssertionError("'saved' adapters are added to the parameters, never intercepted")

    def merge(self, kernel, adapter):
        return (kernel.astype(jnp.float32) + adapter.params["w"]).astype(kernel.dtype)

    def unmerge(self, kernel, adapter):
        return (kernel.astype(jnp.float32) - adapter.params["w"]).astype(kernel.dtype)

    def leaf_axes(self, adapter):
        return {"w": ("stack", "kernel")}
