"""lora_jax: low-rank adaptation as a functional transform of Flax parameter trees.

    import lora_jax as lj
    spec = lj.LoraSpec(rank=8, alpha=16.0, targets=(r".*/(query|value)/kernel",))
    adapters = lj.init_adapters(params, spec, key)
    y = lj.apply(model, params, adapters, x)
    tx = lj.adapter_optimizer(optax.adamw(1e-3), adapters)
    merged = lj.merge(params, adapters)
    print(lj.summary(params, adapters))

Importing this package has no side effects.
"""

from lora_jax import interop, methods, nnx
from lora_jax.bank import combine, set_slot, stack_adapters
from lora_jax.generate import generate, greedy_exact_match
from lora_jax.interop import peft_targets
from lora_jax.layers import Layout
from lora_jax.methods import Adapter, Ctx, Method
from lora_jax.optim import adapter_labels, adapter_optimizer
from lora_jax.quant import dequantize_params, merge_quantized, quantize_params
from lora_jax.rules import PRESETS, Rule, select_targets
from lora_jax.transform import (
    LoraSpec,
    apply,
    count_params,
    init_adapters,
    join,
    materialized,
    merge,
    regularizer,
    split,
    summary,
    trace_layouts,
    transform_base,
    unmerge,
    with_params,
)

__all__ = [
    "Adapter", "Ctx", "Layout", "LoraSpec", "Method", "methods", "regularizer", "transform_base",
    "with_params", "PRESETS", "Rule", "adapter_labels",
    "adapter_optimizer", "apply", "count_params", "init_adapters", "join", "materialized",
    "merge", "nnx", "select_targets", "split", "summary", "trace_layouts", "unmerge",
    "dequantize_params", "merge_quantized", "quantize_params",
    "combine", "generate", "greedy_exact_match", "set_slot", "stack_adapters",
    "interop", "peft_targets",
]
