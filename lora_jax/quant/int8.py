"""Symmetric absmax int8 storage for frozen kernels, and the block helpers NF4 reuses.

A kernel here has `n_stack` leading stacked (layer) axes, then input axes, then output axes. Scales
are shared along the FIRST input axis (axis `n_stack`), either by the whole axis (per output
channel, the default) or by blocks of `block_size` along it; with `n_in` > 1 the further input axes
share their block's scale too. Every other axis keeps its size, so every field of an `Int8Array`
can be sharded like the kernel and sliced on its leading stacked axis (what `nn.scan` does).
Codes are `round(w / scale)` clipped to [-127, 127], `scale = absmax / 127`,
so a round trip is off by at most `scale / 2` per element. This module holds no model code and no
NF4 code; `lora_jax.quant.nf4` reuses the block helpers defined here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127


def blocked_axis(ndim: int, n_stack: int, fn: str, in_axis: int = 0) -> int:
    """Returns the blocked axis of an `ndim`-axis kernel as a NEGATIVE index.

    The blocked axis is per-layer axis `in_axis` (0 = the first axis after the stacked ones), i.e.
    `n_stack + in_axis - ndim`. A negative index stays correct after leading stacked axes are
    sliced off (nn.scan, vmap).
    """
    if not 0 <= n_stack < ndim:
        raise ValueError(
            f"{fn}: n_stack={n_stack} is invalid for a kernel with {ndim} axes; it counts the "
            f"leading stacked (layer) axes and must leave at least one input axis (0 <= n_stack < {ndim})."
        )
    if not 0 <= in_axis < ndim - n_stack:
        raise ValueError(f"{fn}: in_axis={in_axis} is not a per-layer axis of a kernel with {ndim} "
                         f"axes and n_stack={n_stack}; use 0 <= in_axis < {ndim - n_stack}.")
    return n_stack + in_axis - ndim


def check_blocks(shape: tuple, axis: int, block_size: int, fn: str) -> None:
    """Raises a ValueError naming `shape` and `block_size` if `shape[axis]` is not a multiple of it."""
    size = shape[axis]
    if block_size <= 0 or size % block_size:
        raise ValueError(
            f"{fn}: kernel shape {tuple(shape)} has size {size} on its blocked axis "
            f"{len(shape) + axis}, which is not a multiple of block_size={block_size}. Pad that axis "
            f"to a multiple of {block_size}, pass a block_size that divides {size}, or reshape the "
            f"kernel so its first input axis is the large one."
        )


def split_blocks(x: jax.Array, axis: int, block_size: int) -> jax.Array:
    """Splits `axis` (negative) of x into (n_blocks, block_size): (..., n, ...) -> (..., n/B, B, ...)."""
    ax = x.ndim + axis
    return x.reshape(x.shape[:ax] + (x.shape[ax] // block_size, block_size) + x.shape[ax + 1:])


def merge_blocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `split_blocks`; `axis` is the (negative) axis of the MERGED array.

    (..., n/B, B, ...) -> (..., n, ...).
    """
    ax = x.ndim - 1 + axis
    return x.reshape(x.shape[:ax] + (x.shape[ax] * x.shape[ax + 1],) + x.shape[ax + 2:])


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale"],
    meta_fields=["dtype", "axis", "n_in"],
)
@dataclasses.dataclass(frozen=True)
class Int8Array:
    """An int8-quantised kernel; fields keep the kernel's axes.

    For a kernel of shape (*stack, d0, *in_rest, *out):
      codes: int8    (*stack, d0, *in_rest, *out)      round(w / scale), in [-127, 127].
      scale: float32 (*stack, d0 / B, 1 * len(in_rest), *out)  absmax / 127 per block; B = d0 per channel.
      dtype: the original dtype (static).
      axis:  the blocked axis as a negative index (static; stays true when stacked axes are sliced).
      n_in:  axes from `axis` on that share a block's scale (static; kept for `requantize`).
    The logical shape and block size are read from the leaves, never stored.
    """

    codes: jax.Array
    scale: jax.Array
    dtype: np.dtype
    axis: int
    n_in: int = 1

    @property
    def shape(self) -> tuple:
        """Logical (dequantised) shape, derived from the leaves."""
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def block_size(self) -> int:
        """Elements sharing one scale along the blocked axis (the axis length when per channel)."""
        return self.codes.shape[self.axis] // self.scale.shape[self.axis]


@functools.partial(jax.jit, static_argnames=("n_stack", "block_size", "n_in", "in_axis"))
def int8_quantize(w: jax.Array, *, n_stack: int = 0, block_size: int | None = None,
                  n_in: int = 1, in_axis: int = 0) -> Int8Array:
    """Symmetric absmax int8 quantisation along the first input axis.

    Args:
      w: kernel (*stack, d0, *in_rest, *out), any float dtype; `n_stack` leading stacked axes.
      n_stack: number of leading stacked (layer) axes; each slice is quantised on its own.
      block_size: elements of axis `n_stack` sharing one scale; None = the whole axis (per output
        channel). Must divide d0.
      n_in: number of input axes (>= 1). The input axes after the first share their block's scale,
        so with block_size=None the scale is per output channel over all input axes.
      in_axis: per-layer axis to block along (default 0, the first input axis); the `n_in - 1`
        axes after it share its scales. For a kernel whose first input axis is short, e.g. GPT-2's
        attention output (n_head, head_dim, d_model), pick another (see `quant.choose_blocking`).

    Returns:
      Int8Array with codes (*stack, d0, *in_rest, *out) int8 and scale
      (*stack, d0 / block_size, 1, ..., *out) float32.

    Example:
      >>> q = int8_quantize(jnp.ones((64, 8)))
      >>> q.codes.shape, q.scale.shape
      ((64, 8), (1, 8))
    """
    axis = blocked_axis(w.ndim, n_stack, "int8_quantize", in_axis)
    if not 1 <= n_in <= -axis:
        raise ValueError(f"int8_quantize: n_in={n_in} must be in [1, {-axis}] for kernel shape "
                         f"{w.shape} with n_stack={n_stack}, in_axis={in_axis}.")
    block = w.shape[axis] if block_size is None else block_size
    check_blocks(w.shape, axis, block, "int8_quantize")
    xb = split_blocks(w.astype(jnp.float32), axis, block)  # (*stack, nb, B, *in_rest, *out)
    ax = xb.ndim + axis - 1  # position of the nb axis
    reduce = tuple(range(ax + 1, ax + 1 + n_in))  # the B axis and the other input axes
    scale = jnp.max(jnp.abs(xb), axis=reduce, keepdims=True) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(xb / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Array(codes=merge_blocks(codes, axis), scale=jnp.squeeze(scale, ax + 1),
                     dtype=np.dtype(w.dtype), axis=axis, n_in=n_in)


@functools.partial(jax.jit, static_argnames="dtype")
def int8_dequantize(q: Int8Array, dtype=jnp.float32) -> jax.Array:
    """codes * scale, shape (*stack, d0, *in_rest, *out) in `dtype`. Jit-able; works on sliced stacks."""
    block = q.codes.shape[q.axis] // q.scale.shape[q.axis]
    xb = split_blocks(q.codes.astype(jnp.float32), q.axis, block)
    scale = jnp.expand_dims(q.scale, q.scale.ndim + q.axis + 1)
    return merge_blocks(xb * scale, q.axis).astype(dtype)
