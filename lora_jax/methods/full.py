"""Fully trained parameters (PEFT's ``modules_to_save``), held as a delta on the base.

The adapter is ``{'w': D}`` with D of the parameter's shape, initialised to zero; the effective
parameter is ``W + D``. Keeping a delta (not a copy) makes ``unmerge`` exact and lets any
parameter (biases, norms, heads) be trained, not only intercepted kernels. Unlike PEFT's copy,
weight decay pulls D towards 0, i.e. the parameter towards its pretrained value.
"""

from __future__ import annotations

import jax.numpy as jnp

from lora_jax.methods import Adapter


def init(key, kernel, layout, rank, scale, spec) -> Adapter:
    del key, rank, scale, spec
    return Adapter({"w": jnp.zeros(kernel.shape, jnp.float32)}, {}, "full", 1.0, layout)


def output(y, x, adapter, kernel, bias, module, ctx):
    raise AssertionError("'full' adapters are added to the parameters, never intercepted")


def merge(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) + adapter.params["w"]).astype(kernel.dtype)


def unmerge(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) - adapter.params["w"]).astype(kernel.dtype)
