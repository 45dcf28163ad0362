"""4-bit NormalFloat (NF4) storage with double quantisation, as in QLoRA / bitsandbytes.

A kernel has `n_stack` leading stacked (layer) axes, then input axes, then output axes. Blocks of
`block_size` (64) run along one input axis (`in_axis`; the FIRST input axis, axis `n_stack`, by
default), one block per element of the other axes; each block keeps its absmax and each value the
index of the nearest of the 16 NF4 levels (times absmax). Two indices pack into one uint8 along
that axis: element 2i in the HIGH nibble, element 2i+1 in the LOW nibble (bitsandbytes' order).
Double quantisation subtracts the per-slice mean of the absmax constants and quantises the rest in
groups of `dq_block_size` (256) consecutive constants along the LAST axis of the absmax array (the
final group may be shorter), each group scaled by its own absmax. The default, 'dynamic', is
bitsandbytes' scheme: the nearest of the 256 values of its dynamic 8-bit code (`DYNAMIC_CODE`),
stored as a uint8 index; 'linear' stores symmetric int8 (round(x * 127)). The absmax dtype says
which (uint8 dynamic, int8 linear, float32 none). With d_in = block_size the groups are
bitsandbytes' exactly (it groups the flattened (d_out, d_in / 64) array, which straddles output
channels otherwise; we keep the kernel's axes instead); tests compare against its dequantised
values. Storage: 4 + 8/64 + 32/(64*256) ~= 4.127 bits per parameter. Every field keeps the kernel's
axes (leading stacked axes included), so the fields shard like the kernel and `nn.scan` can slice
them. Nothing here knows about models; int8 storage lives in `lora_jax.quant.int8`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.int8 import INT8_MAX, blocked_axis, check_blocks, merge_blocks, split_blocks

# The 16 NF4 levels, exactly as bitsandbytes defines them (numpy: importing creates no JAX arrays).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# Decision thresholds between neighbouring levels; a value on a threshold takes the lower level.
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace filled from both ends (torch's CPU rounding): a float32 step, each point
    computed in float64 from an end and rounded to float32."""
    a, b = np.float64(np.float32(start)), np.float64(np.float32(stop))
    step = np.float64(np.float32(b - a) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    return np.where(i < num // 2, a + step * i, b - step * (num - 1 - i)).astype(np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit code (its `create_dynamic_map()`): (256,) float32, sorted.

    For exponents e = -6..0 it holds the 2^(e+6) midpoints of a linspace(0.1, 1) with 2^(e+6)+1
    points, times 10^e, with both signs; plus 0 and 1. Equal, value for value, to the table
    bitsandbytes 0.50 builds (checked against it in tests/quant/fixtures).
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += list(scaled) + list(-scaled)
    return np.sort(np.asarray(values, np.float32))


DYNAMIC_CODE = dynamic_code()
_DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) / 2
DQ_SCHEMES = ("dynamic", "linear")


def dq_scheme(double_quant: bool | str | None) -> str | None:
    """'dynamic' | 'linear' | None from `nf4_quantize`'s `double_quant` (True means 'dynamic')."""
    if double_quant is True:
        return "dynamic"
    if double_quant is False or double_quant is None:
        return None
    if double_quant not in DQ_SCHEMES:
        raise ValueError(f"double_quant={double_quant!r}; use 'dynamic' (bitsandbytes' code, the "
                         "default, also True), 'linear' (int8) or False.")
    return double_quant


def nf4_nearest_code(x: jax.Array) -> jax.Array:
    """Index (uint8, 0..15) of the nearest NF4 level for each x in [-1, 1]; same shape as x."""
    return jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x, side="left").astype(jnp.uint8)


def pack_nibbles(codes: jax.Array, axis: int = 0) -> jax.Array:
    """Packs 4-bit codes two per byte along `axis`: (..., 2n, ...) -> (..., n, ...) uint8.

    Element 2i goes to the high nibble, element 2i+1 to the low nibble (bitsandbytes' order).
    """
    neg = axis - codes.ndim if axis >= 0 else axis
    pairs = split_blocks(codes.astype(jnp.uint8), neg, 2)  # (..., n, 2, ...)
    pair_axis = pairs.ndim + neg
    hi, lo = jnp.take(pairs, 0, axis=pair_axis), jnp.take(pairs, 1, axis=pair_axis)
    return (hi << 4) | (lo & 0xF)


def unpack_nibbles(packed: jax.Array, axis: int = 0) -> jax.Array:
    """Inverse of `pack_nibbles`: (..., n, ...) uint8 -> (..., 2n, ...) uint8 codes in 0..15."""
    neg = axis - packed.ndim if axis >= 0 else axis
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=packed.ndim + neg + 1)  # (..., n, 2, ...)
    return merge_blocks(pairs, neg)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_scale", "absmax_mean"],
    meta_fields=["dtype", "axis", "block_size", "dq_block_size"],
)
@dataclasses.dataclass(frozen=True)
class NF4Array:
    """An NF4-quantised kernel; every field keeps the kernel's axes.

    For a kernel of shape (*stack, d0, *rest) with B = block_size, Q = dq_block_size, L = last axis
    of the absmax array (rest[-1], or d0 / B when rest is empty):
      codes:        uint8   (*stack, d0 / 2, *rest)  two NF4 indices per byte (high nibble first).
      absmax:       float32 (*stack, d0 / B, *rest)  without double quantisation, or
                    uint8   (*stack, d0 / B, *rest)  index into DYNAMIC_CODE of
                            (absmax - mean) / absmax_scale (the default), or
                    int8    (*stack, d0 / B, *rest)  round(127 (absmax - mean) / absmax_scale).
      absmax_scale: float32 (*stack, d0 / B, *rest[:-1], ceil(L / Q)) group absmax, or None.
      absmax_mean:  float32 (*stack,)  mean absmax of each slice, or None.
      dtype: original dtype; axis: blocked axis as a negative index; block sizes (all static).
    The logical shape is read from the leaves (`shape`), so slices of a stack stay correct.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_mean: jax.Array | None
    dtype: np.dtype
    axis: int
    block_size: int
    dq_block_size: int

    @property
    def shape(self) -> tuple:
        """Logical (dequantised) shape, derived from the leaves."""
        shape = list(self.codes.shape)
        shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim


def _pad_last(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads the last axis of x up to a multiple of `multiple`."""
    pad = -x.shape[-1] % multiple
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _quantize_absmax(absmax: jax.Array, n_stack: int, dq_block_size: int, scheme: str):
    """Double quantisation of (*stack, ...) float32 absmax constants.

    Returns (codes like absmax: uint8 indices into DYNAMIC_CODE or int8, group absmax
    (..., ceil(L/Q)) float32, per-slice mean (*stack,) float32).
    """
    inner = tuple(range(n_stack, absmax.ndim))
    mean = jnp.mean(absmax, axis=inner)
    resid = absmax - mean.reshape(mean.shape + (1,) * len(inner))
    blocks = split_blocks(_pad_last(resid, dq_block_size), -1, dq_block_size)  # (..., m, Q)
    group_max = jnp.max(jnp.abs(blocks), axis=-1)  # (..., m)
    unit = blocks / jnp.where(group_max > 0, group_max, 1.0)[..., None]  # in [-1, 1]
    if scheme == "dynamic":
        codes = jnp.searchsorted(jnp.asarray(_DYNAMIC_MIDPOINTS), unit, side="left")
        codes = codes.astype(jnp.uint8)
    else:
        codes = jnp.clip(jnp.round(unit * INT8_MAX), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return merge_blocks(codes, -1)[..., :absmax.shape[-1]], group_max, mean


def nf4_absmax(q: NF4Array) -> jax.Array:
    """The per-block absmax constants (*stack, d0 / B, *rest) float32, undoing double quantisation."""
    if q.absmax_scale is None:
        return q.absmax.astype(jnp.float32)
    if q.absmax.dtype == jnp.uint8:  # dynamic code
        unit = jnp.asarray(DYNAMIC_CODE)[q.absmax]
    else:  # linear int8
        unit = q.absmax.astype(jnp.float32) / INT8_MAX
    size = q.absmax.shape[-1]
    blocks = split_blocks(_pad_last(unit, q.dq_block_size), -1, q.dq_block_size)
    resid = merge_blocks(blocks * q.absmax_scale[..., None], -1)[..., :size]
    mean = q.absmax_mean
    return resid + mean.reshape(mean.shape + (1,) * (resid.ndim - mean.ndim))


@functools.partial(jax.jit, static_argnames=("n_stack", "block_size", "double_quant",
                                             "dq_block_size", "in_axis"))
def nf4_quantize(w: jax.Array, *, n_stack: int = 0, block_size: int = 64,
                 double_quant: bool | str = True,
                 dq_block_size: int = 256, in_axis: int = 0) -> NF4Array:
    """Block-wise absmax NF4 quantisation along one input axis (default: the first, `n_stack`).

    Args:
      w: kernel (*stack, d0, *rest), any float dtype; d0 must be a multiple of `block_size`.
      n_stack: number of leading stacked (layer) axes; each slice is quantised on its own.
      block_size: values of axis `n_stack` sharing one absmax (even; 64 in QLoRA).
      double_quant: how the absmax constants are stored (mean-subtracted, in groups of
        `dq_block_size` along the last axis of the absmax array): 'dynamic' (bitsandbytes'
        dynamic 8-bit code, uint8; also True, the default), 'linear' (int8), or False (float32).
      dq_block_size: absmax constants per second-level float32 scale (256 in QLoRA).
      in_axis: per-layer axis to block (and pack) along; 0 = the first input axis. A kernel whose
        first input axis is short (GPT-2's attention output (n_head, head_dim, d_model)) blocks
        along another input axis instead; `quant.choose_blocking` picks one from the layout.

    Returns:
      NF4Array; for w (d_in, d_out): codes (d_in/2, d_out) uint8, absmax (d_in/64, d_out) uint8,
      absmax_scale (d_in/64, ceil(d_out/256)) float32, absmax_mean () float32.

    Example:
      >>> q = nf4_quantize(jnp.ones((128, 512)))
      >>> q.codes.shape, q.absmax.shape, q.absmax_scale.shape
      ((64, 512), (2, 512), (2, 2))
    """
    axis = blocked_axis(w.ndim, n_stack, "nf4_quantize", in_axis)
    scheme = dq_scheme(double_quant)
    if block_size % 2:
        raise ValueError(f"nf4_quantize: block_size={block_size} must be even (two codes per byte).")
    check_blocks(w.shape, axis, block_size, "nf4_quantize")
    xb = split_blocks(w.astype(jnp.float32), axis, block_size)  # (*stack, nb, B, *rest)
    b_axis = xb.ndim + axis  # the B axis
    absmax = jnp.max(jnp.abs(xb), axis=b_axis)  # (*stack, nb, *rest)
    safe = jnp.expand_dims(jnp.where(absmax > 0, absmax, 1.0), b_axis)
    codes = pack_nibbles(merge_blocks(nf4_nearest_code(xb / safe), axis), axis)
    scale = mean = None
    if scheme is not None:
        absmax, scale, mean = _quantize_absmax(absmax, n_stack, dq_block_size, scheme)
    return NF4Array(codes=codes, absmax=absmax, absmax_scale=scale, absmax_mean=mean,
                    dtype=np.dtype(w.dtype), axis=axis, block_size=block_size,
                    dq_block_size=dq_block_size)


@functools.partial(jax.jit, static_argnames="dtype")
def nf4_dequantize(q: NF4Array, dtype=jnp.float32) -> jax.Array:
    """NF4 level * block absmax, shape `q.shape` = (*stack, d0, *rest) in `dtype`. Jit-able."""
    values = jnp.asarray(NF4_CODE)[unpack_nibbles(q.codes, q.axis)]
    block = 2 * q.codes.shape[q.axis] // q.absmax.shape[q.axis]
    xb = split_blocks(values, q.axis, block)
    absmax = jnp.expand_dims(nf4_absmax(q), xb.ndim + q.axis)
    return merge_blocks(xb * absmax, q.axis).astype(dtype)
