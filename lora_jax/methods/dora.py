"""DoRA (Liu et al. 2024): weight-decomposed LoRA, ``W' = m ⊙ V / ‖V‖`` with ``V = W + s·A B``.

``m`` has one entry per output feature (shape ``(*stack, *out)``), initialised to the column
norms of W (the norm runs over the kernel's input axes). In the forward pass the norm ‖V‖ is
detached from the graph, the paper's default, and the computation reuses the base output:

    y' = y + (m/‖V‖ − 1) ⊙ (y − bias) + (m/‖V‖) ⊙ s·drop(x) A B

``‖V‖`` needs ``A B`` densely once per layer call (as in PEFT); the input path stays factored.
``unmerge`` keeps the base column norms ``‖W‖`` as adapter state: given W', W = λW' − s·A B with
the positive λ for which ‖W‖ matches, exact whenever ⟨W, V⟩ > 0 per column (the update does not
flip a column, true for any reasonable adapter).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx
from lora_jax.methods import lora


def _in_axes(layout: layers.Layout, n_stack: int) -> tuple[int, ...]:
    return tuple(range(n_stack, n_stack + len(layout.in_shape)))


def _column_norm(w_canon, layout, n_stack):
    return jnp.sqrt(jnp.sum(jnp.square(w_canon), axis=_in_axes(layout, n_stack)))


def _expand(v, layout, n_stack):
    """(*stack, *out) -> broadcastable against (*stack, *in, *out)."""
    return jnp.expand_dims(v, _in_axes(layout, n_stack))


def _weight_norm(kernel, adapter, n_stack):
    v = kernel.astype(jnp.float32) + lora.weight_delta(adapter)
    return _column_norm(layers.to_canonical(adapter.layout, v), adapter.layout, n_stack)


def _check_layout(layout: layers.Layout) -> None:
    if layout.kind == "embed":
        raise ValueError("DoRA on an embedding table is not supported; target kernels only")
    y_spec = layout.hb.split("->")[1]
    outs = layout.hb.split(",")[1].split("->")[0].replace(layers.R, "")
    if layout.kind == "dense" and not y_spec.endswith(outs):
        raise ValueError(f"DoRA needs the output axes last in the layer output ({layout.hb})")


@dataclasses.dataclass(frozen=True)
class DoRA(lora.LoRA):
    """DoRA: LoRA's hyperparameters (``init_weights``, ``lora_plus_ratio``) and a magnitude."""

    name: ClassVar[str] = "dora"
    stackable: ClassVar[bool] = False  # its magnitude is not in the bank

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        _check_layout(layout)
        a, b = lora.init_factors(key, kernel, layout, rank, scale, self.init_weights)
        w = layers.to_canonical(layout, kernel.astype(jnp.float32))
        norm = _column_norm(w, layout, layout.n_stack)
        # Two buffers: the trainer donates trainable arrays, which must not alias frozen state.
        return Adapter({"a": a, "b": b, "m": norm}, {"base_norm": jnp.copy(norm)}, self, scale,
                       layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        norm = jax.lax.stop_gradient(_weight_norm(kernel, adapter, 0))
        g = (adapter.params["m"] / norm).astype(y.dtype)
        if ctx.dropout_active(adapter):  # PEFT / the authors: rescale the dropped input's x·W
            base = layers.base_output(adapter.layout, x, kernel, module).astype(y.dtype)
        else:
            base = y if bias is None else y - bias.astype(y.dtype)
        return y + (g - 1) * base + g * lora.delta(x, adapter, module).astype(y.dtype)

    def merge(self, kernel, adapter):
        layout, n = adapter.layout, adapter.layout.n_stack
        v = layers.to_canonical(layout, kernel.astype(jnp.float32) + lora.weight_delta(adapter))
        w = _expand(adapter.params["m"] / _column_norm(v, layout, n), layout, n) * v
        return layers.from_canonical(layout, w).astype(kernel.dtype)

    def unmerge(self, kernel, adapter):
        layout, n = adapter.layout, adapter.layout.n_stack
        axes = _in_axes(layout, n)
        w1 = layers.to_canonical(layout, kernel.astype(jnp.float32))
        d = layers.to_canonical(layout, lora.weight_delta(adapter))
        qa = jnp.sum(w1 * w1, axes)
        qb = jnp.sum(w1 * d, axes)
        qc = jnp.sum(d * d, axes) - jnp.square(adapter.state["base_norm"])
        lam = (qb + jnp.sqrt(jnp.maximum(qb * qb - qa * qc, 0.0))) / qa
        w = _expand(lam, layout, n) * w1 - d
        return layers.from_canonical(layout, w).astype(kernel.dtype)

    def transform_base(self, kernel, adapter):
        """PiSSA: the residual ``W − s·A B`` exactly (as LoRA's); the magnitude keeps ‖W‖ (so
        the model starts as the pretrained one) and unmerge's base norm becomes the residual's."""
        kernel, adapter = super().transform_base(kernel, adapter)
        n = adapter.layout.n_stack
        norm = _column_norm(layers.to_canonical(adapter.layout, kernel.astype(jnp.float32)),
                            adapter.layout, n)
        return kernel, dataclasses.replace(adapter, state={"base_norm": norm})

    def leaf_axes(self, adapter):
        return {**lora.AXES, "m": ("stack", "out"), "base_norm": ("stack", "out")}
