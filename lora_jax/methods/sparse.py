"""Sparse (LoSA) adapters: ``y = x W + s · drop(x) (M ⊙ (A diag(m_r) B))`` with M = (W ≠ 0).

The sparsity mask ``M`` (bool, the kernel's shape) and the rank mask ``m_r`` (float32, shape
``(*stack, r_max)``) are non-trainable adapter state (``Adapter.state['mask']``,
``Adapter.state['rank_mask']``): LoSA's schedule (``lora_jax.sparsity.schedule``) rewrites both
between training segments while A and B keep their fixed ``r_max`` size, so shapes and the
compiled step never change. Because M is elementwise on ``A B``, this method **cannot stay
factored**: the adapted layer forms the masked product densely. It does the cheapest correct
thing: when the branch sees the same input as the base (no adapter dropout), the layer computes
``x (W + s M⊙(A B))`` once and the base output it was handed is dead code that XLA removes, so a
step costs one dense matmul per layer, as in full fine-tuning. The masked product and the matmul
sit inside ``jax.checkpoint`` (option ``remat``, default on), so backward recomputes
``M ⊙ (A B)`` instead of keeping a kernel-sized residual per layer. ``merge`` gives a kernel whose
zeros are exactly the base's (M is False there), which is the point of LoSA. Embeddings and
convolutions are not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, lora


def _axes(layout: layers.Layout) -> tuple[str, str, str, str]:
    """(x spec, input letters, output letters, y spec) parsed from the layout's einsums."""
    x_spec, rest = layout.xa.split(",")
    ins = rest.split("->")[0].replace(layers.R, "")
    outs = layout.hb.split(",")[1].split("->")[0].replace(layers.R, "")
    return x_spec, ins, outs, layout.hb.split("->")[1]


def init(key, kernel, layout, rank, scale, spec) -> Adapter:
    if layout.kind != "dense":
        raise ValueError(f"sparse (LoSA) adapters support Dense/DenseGeneral/Einsum kernels, not "
                         f"{layout.kind!r} (kernel {layout.kernel_shape}); exclude it from targets")
    a, b = lora.init_factors(key, kernel, layout, rank, scale, spec.init)
    stack = kernel.shape[: layout.n_stack]
    state = {"mask": kernel != 0, "rank_mask": jnp.ones(stack + (rank,), jnp.float32)}
    options = (("remat", bool(spec.option("remat", True))),)
    return Adapter({"a": a, "b": b}, state, "losa", scale, layout, spec.dropout, options)


def masked_delta(adapter: Adapter, params=None, state=None) -> jax.Array:
    """``s · M ⊙ (A diag(m_r) B)`` in canonical order ``(*stack, *in, *out)``, float32."""
    p = adapter.params if params is None else params
    st = adapter.state if state is None else state
    layout = adapter.layout
    _, ins, outs, _ = _axes(layout)
    rm = st["rank_mask"]
    rm = jnp.expand_dims(rm, tuple(range(rm.ndim - 1, rm.ndim - 1 + len(ins))))
    a = p["a"].astype(jnp.float32) * rm
    d = jnp.einsum(f"...{ins}R,...R{outs}->...{ins}{outs}", a, p["b"].astype(jnp.float32))
    return jnp.where(layers.to_canonical(layout, st["mask"]), adapter.scale * d, 0.0)


def output(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    x_spec, ins, outs, y_spec = _axes(adapter.layout)
    contract = f"{x_spec},{ins}{outs}->{y_spec}"
    dropped = ctx.train and adapter.dropout > 0  # then x differs from the base layer's input

    def adapted(x, params, state, kernel):
        d = masked_delta(adapter, params, state)
        if dropped:
            return jnp.einsum(contract, x, d.astype(x.dtype))
        w = layers.to_canonical(adapter.layout, kernel.astype(jnp.float32)) + d
        return jnp.einsum(contract, x, w.astype(x.dtype))

    if adapter.option("remat", True):
        adapted = jax.checkpoint(adapted)
    out = adapted(x.astype(y.dtype), adapter.params, adapter.state, kernel).astype(y.dtype)
    if dropped:
        return y + out
    return out if bias is None else out + bias.astype(y.dtype)


def merge(kernel, adapter: Adapter):
    d = layers.from_canonical(adapter.layout, masked_delta(adapter))
    return (kernel.astype(jnp.float32) + d).astype(kernel.dtype)


def unmerge(kernel, adapter: Adapter):
    d = layers.from_canonical(adapter.layout, masked_delta(adapter))
    return (kernel.astype(jnp.float32) - d).astype(kernel.dtype)
