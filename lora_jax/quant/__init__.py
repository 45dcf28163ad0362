"""Quantised storage for frozen kernels (QLoRA): NF4 with double quantisation, and int8.

Quantised kernels are pytrees (`NF4Array`, `Int8Array`) whose array fields keep the kernel's axes,
so they jit, shard and slice under `nn.scan` like the kernel they replace; `dequantize` turns one
back into a dense array right before use. Layouts and error bounds are documented in `nf4` and
`int8`; choosing kernels by target rules, the blocked axis, and merges into a quantised base with an
error report live in `qlora`. Running a model on quantised leaves is `lora_jax.apply`'s job.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.quant.int8 import Int8Array, int8_dequantize, int8_quantize
from lora_jax.quant.nf4 import NF4_CODE, NF4Array, nf4_dequantize, nf4_quantize
from lora_jax.quant.qlora import (MergeReport, choose_blocking, dequantize_params, merge_quantized,
                                  quantize_params, requantize)

__all__ = [
    "NF4_CODE", "NF4Array", "Int8Array", "nf4_quantize", "nf4_dequantize", "int8_quantize",
    "int8_dequantize", "quantize", "dequantize", "is_quantized", "nbytes", "MergeReport",
    "choose_blocking", "dequantize_params", "merge_quantized", "quantize_params", "requantize",
]

_QUANTIZERS = {"nf4": nf4_quantize, "int8": int8_quantize}


def quantize(w: jax.Array, kind: str, n_stack: int = 0, **kwargs) -> NF4Array | Int8Array:
    """Quantises kernel w (*stack, d0, ...) with `kind` in {'nf4', 'int8'}; kwargs go to that quantiser."""
    if kind not in _QUANTIZERS:
        raise ValueError(f"quantize: unknown kind {kind!r}; use one of {sorted(_QUANTIZERS)}.")
    return _QUANTIZERS[kind](w, n_stack=n_stack, **kwargs)


def is_quantized(x) -> bool:
    """True for an `NF4Array` or `Int8Array`."""
    return isinstance(x, (NF4Array, Int8Array))


def dequantize(q, dtype=jnp.float32) -> jax.Array:
    """Dense kernel in `dtype` from an NF4Array / Int8Array; a plain array is only cast to `dtype`."""
    if isinstance(q, NF4Array):
        return nf4_dequantize(q, dtype)
    if isinstance(q, Int8Array):
        return int8_dequantize(q, dtype)
    return jnp.asarray(q).astype(dtype)


def nbytes(tree) -> int:
    """Bytes held by all array leaves of `tree` (a quantised kernel or any pytree of arrays)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
