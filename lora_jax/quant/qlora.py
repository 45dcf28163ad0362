"""QLoRA over parameter trees: which kernels to quantise, how to block them, and honest merges.

`quantize_params` replaces the kernels chosen by target rules (the same regexes and presets as
adapters, e.g. 'all-linear') with `NF4Array` / `Int8Array` leaves of `'params'`; `choose_blocking`
decides from the kernel's `Layout` which input axis the blocks run along, so kernels whose first
input axis is short (GPT-2's attention output (n_head, head_dim, d_model)) quantise without
reshaping; `dequantize_params` turns the tree dense again. `merge_quantized` folds adapters into a
quantised base (dequantise, add, re-quantise) and reports what the re-quantisation costs on a batch.
The forward pass over quantised leaves (each kernel dequantised inside its intercepted layer) lives
in `lora_jax.transform`; storage formats in `nf4` and `int8`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lora_jax import layers, rules
from lora_jax.quant.int8 import Int8Array, int8_quantize
from lora_jax.quant.nf4 import NF4Array, nf4_quantize


def _is_quantized(x) -> bool:
    return isinstance(x, (NF4Array, Int8Array))


def input_axes(layout: layers.Layout) -> tuple[int, ...]:
    """Positions of the input axes in the per-layer kernel (any order Einsum allows), ascending."""
    src, dst = (s.replace("...", "") for s in layout.canon.split("->"))
    return tuple(sorted(src.index(c) for c in dst[: len(layout.in_shape)]))


def choose_blocking(layout: layers.Layout, kind: str, block_size: int = 64) -> dict:
    """Keyword arguments for `quantize(kernel, kind, n_stack, **kw)` that fit this kernel.

    NF4 blocks run along ONE input axis: the largest input axis whose size `block_size` divides,
    else the input axis sharing the largest even divisor with `block_size`, which then becomes the
    block size (a (4, 32, 128) kernel blocks along its 32-axis in blocks of 32; a (12, 64, 768)
    kernel along its 64-axis in blocks of 64). int8 keeps one scale per output channel over all
    input axes when they are contiguous, else per (other axes) along the largest input axis.

    Returns:
      {'in_axis': i, 'block_size': b} for 'nf4'; {'in_axis': i, 'n_in': n} for 'int8'.
    """
    if layout.kind == "embed":
        raise ValueError("QLoRA quantises linear layers; an embedding table is not supported "
                         f"(kernel {layout.kernel_shape}). Exclude it from the quant targets.")
    axes = input_axes(layout)
    shape = layout.kernel_shape
    if kind == "int8":
        if axes == tuple(range(axes[0], axes[0] + len(axes))):
            return {"in_axis": axes[0], "n_in": len(axes)}
        return {"in_axis": max(axes, key=lambda a: shape[a]), "n_in": 1}
    if kind != "nf4":
        raise ValueError(f"unknown quantisation kind {kind!r}; use 'nf4' or 'int8'")

    def block(a):
        g = math.gcd(shape[a], block_size)
        return g if g % 2 == 0 else 0

    best = max(axes, key=lambda a: (block(a), shape[a] if block(a) == block_size else 0))
    if not block(best):
        raise ValueError(
            f"NF4 needs an input axis with an even size to block along; kernel {shape} has input "
            f"axes of sizes {[shape[a] for a in axes]}. Quantise it as int8 or exclude it.")
    return {"in_axis": best, "block_size": block(best)}


def _layout(path: str, kernel, layouts: Mapping[str, layers.Layout] | None) -> layers.Layout:
    if layouts and path in layouts:
        layout = layouts[path]
        n_stack = kernel.ndim - len(layout.kernel_shape)
        if n_stack < 0 or tuple(kernel.shape[n_stack:]) != layout.kernel_shape:
            raise ValueError(f"{path!r} has shape {kernel.shape} but its layout expects "
                             f"{layout.kernel_shape} per layer")
        return layout.stacked(n_stack)
    if kernel.ndim == 2 and path.endswith("/kernel"):
        return layers.dense_layout(tuple(kernel.shape), 1)
    raise ValueError(
        f"cannot tell the input axes of {path!r} (shape {tuple(kernel.shape)}) from the parameters "
        "alone; trace the model first: layouts = lj.trace_layouts(model, params, *example_inputs), "
        "then lj.quantize_params(params, targets, kind, layouts=layouts)")


def quantize_params(
    params: Mapping[str, Any],
    targets: Sequence[str] | str,
    kind: str,
    *,
    layouts: Mapping[str, layers.Layout] | None = None,
    exclude: Sequence[str] = (),
    block_size: int = 64,
    double_quant: bool | str = True,
) -> dict[str, Any]:
    """Returns `params` with the kernels `targets` selects replaced by quantised leaves.

    Args:
      params: base parameter tree (boxed partitioning metadata is unboxed).
      targets: rules as for adapters (regexes, presets 'qv' | 'attn' | 'all-linear'); every rule
        must match a path. 'all-linear' is every linear layer but the (tied) LM head.
      kind: 'nf4' (QLoRA's NF4 with double quantisation) or 'int8' (absmax per output channel).
      layouts: `lj.trace_layouts(model, params, x)`; needed for all but 2-D Dense kernels (and for
        scanned stacks). Trace BEFORE quantising, or after: `trace_layouts` accepts both.
      exclude: regexes of paths never quantised.
      block_size: NF4 block (64 in QLoRA); see `choose_blocking` for kernels it does not divide.
      double_quant: NF4 only: 'dynamic' (bitsandbytes' double quantisation of the block absmax,
        also True), 'linear' (int8) or False (float32 absmax); see `nf4.nf4_quantize`.
    Returns:
      The same tree; each selected kernel (*stack, *per-layer shape) is an NF4Array/Int8Array
      with the kernel's axes (stacked axes leading), so it shards and scans like the kernel.

    Example:
      >>> layouts = lj.trace_layouts(model, params, tokens)
      >>> qparams = lj.quantize_params(params, "all-linear", "nf4", layouts=layouts)
      >>> logits = lj.apply(model, qparams, adapters, tokens)  # plain model.apply cannot run it
    """
    flat = rules.flatten(nn.meta.unbox(params))
    chosen = rules.match_rules(sorted(flat), rules.as_rules(targets), exclude, what="quant target")
    for path in chosen:
        kernel = flat[path]
        if _is_quantized(kernel):
            raise ValueError(f"{path!r} is already quantised ({type(kernel).__name__})")
        layout = _layout(path, kernel, layouts)
        kw = choose_blocking(layout, kind, block_size)
        if kind == "nf4":
            flat[path] = nf4_quantize(kernel, n_stack=layout.n_stack, double_quant=double_quant, **kw)
        else:
            flat[path] = int8_quantize(kernel, n_stack=layout.n_stack, **kw)
    return rules.unflatten(flat)


def dequantize_params(params: Mapping[str, Any], dtype=None) -> dict[str, Any]:
    """Dense copy of `params`: every quantised leaf dequantised to `dtype` (default: its original).

    `lj.merge(lj.dequantize_params(qparams), adapters)` is the exact merged model (the quantised
    base's values plus the adapters, no re-quantisation), e.g. for a bf16 export.
    """
    from lora_jax.quant import dequantize

    return jax.tree.map(lambda x: dequantize(x, dtype or x.dtype) if _is_quantized(x) else x,
                        dict(params), is_leaf=_is_quantized)


def _dq_of(q: NF4Array) -> str | bool:
    """The `double_quant` argument that made q: its absmax dtype tells."""
    if q.absmax_scale is None:
        return False
    return "dynamic" if q.absmax.dtype == jnp.uint8 else "linear"


def requantize(q: NF4Array | Int8Array, w: jax.Array) -> NF4Array | Int8Array:
    """Quantises w (shape `q.shape`) exactly as `q` was quantised: same kind, axis and blocks."""
    if tuple(w.shape) != q.shape:
        raise ValueError(f"requantize: w has shape {w.shape}, the quantised kernel {q.shape}")
    w = w.astype(q.dtype)
    if isinstance(q, Int8Array):
        return int8_quantize(w, in_axis=w.ndim + q.axis, n_in=q.n_in,
                             block_size=q.block_size)
    n_stack = 0 if q.absmax_mean is None else q.absmax_mean.ndim
    return nf4_quantize(w, n_stack=n_stack, in_axis=w.ndim + q.axis - n_stack,
                        block_size=q.block_size, double_quant=_dq_of(q),
                        dq_block_size=q.dq_block_size)


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """What merging into a quantised base changed.

    Attributes:
      logits_max_abs, logits_mean_abs: |merged − unmerged| of the model output on the given batch
        (both through `lj.apply`, float32).
      kernel_max_abs: per re-quantised path, max |dequant(requant(W + ΔW)) − (W + ΔW)|.
    """

    logits_max_abs: float
    logits_mean_abs: float
    kernel_max_abs: dict

    def __str__(self) -> str:
        worst = max(self.kernel_max_abs.values(), default=0.0)
        return (f"merge into quantised base: logits max |Δ| {self.logits_max_abs:.4g}, mean |Δ| "
                f"{self.logits_mean_abs:.4g}; {len(self.kernel_max_abs)} kernels re-quantised, "
                f"worst kernel max |Δ| {worst:.4g}")


def merge_quantized(model: nn.Module, params, adapters, *args, **kwargs):
    """Folds adapters into a (partly) quantised base and measures the error that introduces.

    Each adapted quantised kernel is dequantised (float32), merged with its method's `merge`, and
    re-quantised like the original (`requantize`); plain kernels are merged as by `lj.merge`.

    Args:
      model: the Flax module; params: base tree with quantised leaves; adapters: as for `lj.apply`.
      *args, **kwargs: a batch for `lj.apply(model, params, adapters, *args, **kwargs)`.
    Returns:
      (merged params, `MergeReport`); the report's logit differences are those of
      `lj.apply(model, merged, {}, *args, **kwargs)` against the unmerged forward.
    """
    from lora_jax import transform
    from lora_jax.quant import dequantize

    params = nn.meta.unbox(params)
    flat = rules.flatten(params)
    kernel_err = {}
    for path, adapter in rules.flatten(adapters).items():
        if path not in flat:
            raise ValueError(f"adapter for {path!r} has no parameter at that path")
        w, method = flat[path], adapter.method
        if not _is_quantized(w):
            flat[path] = method.merge(w, adapter)
            continue
        exact = method.merge(dequantize(w, jnp.float32), adapter)
        flat[path] = requantize(w, exact)
        kernel_err[path] = float(jnp.max(jnp.abs(dequantize(flat[path], jnp.float32) - exact)))
    merged = rules.unflatten(flat)
    ref = transform.apply(model, params, adapters, *args, **kwargs)
    out = transform.apply(model, merged, {}, *args, **kwargs)
    diff = jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))
    return merged, MergeReport(float(jnp.max(diff)), float(jnp.mean(diff)), kernel_err)
