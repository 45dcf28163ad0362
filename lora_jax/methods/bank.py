"""A bank of LoRA adapters, routed per example: Punica/S-LoRA's batched gather, in pure JAX.

A bank leaf (made by ``lj.stack_adapters``, never trained) holds N LoRAs of one kernel, stacked on
an axis right after the stacked-layer axes and padded with zeros to the largest rank R, each with
its own scale folded into its B (so the bank's scale is 1):

    a: (*stack, N, *in, R)        b: (*stack, N, R, *out)

For example b with slot ``ctx.adapter_ids[b]`` = i (−1: base only):

    y_b = x_b W + x_b A_i B_i

``output`` gathers each example's factors (``A[ids]``: (batch, *in, R), a few KB per layer at rank
8) and contracts them with the layout's own einsums with a batch letter added, so the cost is one
LoRA's FLOPs whatever the mix of adapters: no Python loop over adapters and no N-fold rank. Zero
padding of the rank is exact. Dense (Dense, DenseGeneral, Einsum) and embedding layouts are
supported; conv kernels are not (use one adapter at a time there). A bank has no merge of its own:
``lj.merge(params, bank, task=i)`` merges slot i (``merge_task``).

A scalar ``adapter_ids`` routes the whole batch to one slot: ``x A_i B_i`` as one matmul, no
per-example gather. A batched sweep (lora_jax/train/batched.py) ``jax.vmap``s the forward pass
over its points with the slot mapped, so each point's rows meet only its own factors.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method

_BATCH = "Z"  # the per-example letter added to the layout's einsums (layouts use a-z and R)


def per_example(spec: str) -> str:
    """Einsum ``x, K -> y`` turned into ``x, K_b -> y`` with K gathered per example (batch first).

    ``'...a,aR->...R'`` -> ``'Z...a,ZaR->Z...R'``; an explicit first letter of x (``'bsd,dR->bsR'``)
    is taken as the batch axis: ``'bsd,bdR->bsR'``.
    """
    lhs, y = spec.split("->")
    x, k = lhs.split(",")
    if x.startswith("..."):
        return f"{_BATCH}{x},{_BATCH}{k}->{_BATCH}{y}"
    if x[0] not in y:
        raise ValueError(f"einsum {spec!r}: the input's first axis is not kept in the output, so "
                         "it cannot be the batch axis a bank routes on")
    return f"{x},{x[0]}{k}->{y}"


def _slot_delta(x, a, b, layout: layers.Layout):
    """``x A B`` with one slot's factors (a: (*in, R), b: (R, *out)) for every row of x."""
    h = a[x] if layout.kind == "embed" else jnp.einsum(layout.xa, x, a.astype(x.dtype))
    return layers.up(layout, h, b)


def _check_kind(layout: layers.Layout):
    if layout.kind not in ("dense", "embed"):
        raise ValueError(f"a bank supports dense and embedding layers, not {layout.kind!r} "
                         "kernels; apply conv adapters one at a time")


def _check_ids(ids, batch: int, n_slots: int):
    if ids is None:
        raise ValueError("a bank of adapters needs adapter_ids: lj.apply(..., adapter_ids=ids) "
                         "with ids (batch,) in [-1, n_adapters)")
    if jnp.ndim(ids) == 0:
        lo = 0  # one slot for the whole batch: no -1
    elif jnp.ndim(ids) != 1 or jnp.shape(ids)[0] != batch:
        raise ValueError(f"adapter_ids must have shape (batch,) = ({batch},) or be a scalar, "
                         f"got {jnp.shape(ids)}; the bank routes on the first axis of each layer "
                         "input")
    else:
        lo = -1
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"adapter_ids must be integers, got {jnp.result_type(ids)}")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < lo) | (bad >= n_slots)]
        if bad.size:
            raise ValueError(f"adapter ids {sorted(set(bad.tolist()))} outside "
                             f"[{lo}, {n_slots}): the bank has {n_slots} adapters"
                             + (" (-1 = base only)" if lo < 0 else " (a scalar id: one slot "
                                "for the whole batch)"))


def delta(x, adapter: Adapter, ids):
    """``x_b A_{ids_b} B_{ids_b}`` for one layer (stacked axes already sliced off), zero where
    ``ids_b == -1``; x has the batch axis first. ``ids`` may be a scalar (every row on that
    slot)."""
    a, b, layout = adapter.params["a"], adapter.params["b"], adapter.layout
    n_slots = a.shape[0]
    _check_ids(ids, x.shape[0], n_slots)
    _check_kind(layout)
    ids = jnp.asarray(ids)
    if ids.ndim == 0:
        return _slot_delta(x, a[ids], b[ids], layout)
    slot = jnp.clip(ids, 0, n_slots - 1)
    if layout.kind == "embed":
        h = a[slot.reshape((-1,) + (1,) * (x.ndim - 1)), x]
    else:
        h = jnp.einsum(per_example(layout.xa), x, jnp.take(a, slot, axis=0).astype(x.dtype))
    keep = (ids >= 0).reshape((-1,) + (1,) * (h.ndim - 1))
    h = jnp.where(keep, h, 0)
    return layers.up_einsum(per_example(layout.hb), h, jnp.take(b, slot, axis=0).astype(h.dtype))


def weight_delta(adapter: Adapter, slot: int) -> jax.Array:
    """``A_i B_i`` of slot i in the kernel's axis order, float32, stacked axes leading."""
    n = adapter.layout.n_stack
    n_slots = adapter.params["a"].shape[n]
    if not 0 <= slot < n_slots:
        raise ValueError(f"bank slot {slot} outside [0, {n_slots})")
    pick = lambda x: jnp.take(x, slot, axis=n)
    return layers.product(adapter.layout, pick(adapter.params["a"]), pick(adapter.params["b"]))


@dataclasses.dataclass(frozen=True)
class Bank(Method):
    """N LoRAs of one kernel, one per example (``lj.stack_adapters``; not trained from scratch)."""

    name: ClassVar[str] = "bank"

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        raise ValueError("a bank is not trained from scratch: build it from trained adapters "
                         "with lj.stack_adapters({name: adapters, ...})")

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        return y + delta(x, adapter, ctx.adapter_ids).astype(y.dtype)

    def merge(self, kernel, adapter):
        raise ValueError("a bank holds several adapters; merge one slot: lj.merge(params, bank, "
                         "task=slot). (A tied LM head reads a merged table, so banks cannot "
                         "adapt a tied embedding; leave it out of the targets.)")

    unmerge = merge

    def merge_task(self, kernel, adapter, task):
        """``W + A_i B_i`` for bank slot ``task``."""
        return (kernel.astype(jnp.float32) + weight_delta(adapter, task)).astype(kernel.dtype)

    def unmerge_task(self, kernel, adapter, task):
        return (kernel.astype(jnp.float32) - weight_delta(adapter, task)).astype(kernel.dtype)

    def leaf_axes(self, adapter):
        return {"a": ("stack", None, "in", None), "b": ("stack", None, None, "out")}
