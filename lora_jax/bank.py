"""Several LoRA adapters on one base: a bank routed per example, hot swap, weighted combination.

``stack_adapters({name: adapters})`` turns trained LoRA trees (same base, any ranks and targets)
into one bank (``methods/bank.py`` holds its math) for ``lj.apply(..., adapter_ids=ids)`` and
``lj.generate``: slot i is the i-th name. ``set_slot`` replaces one slot's contents without
changing any shape, so jitted functions do not retrace. ``combine(adapters_list, weights, how)``
makes one LoRA from several, as PEFT's ``add_weighted_adapter`` does ('linear', 'cat', 'svd').
Every function here works on adapter trees and returns new ones; nothing is trained here.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax.numpy as jnp

from lora_jax import layers, rules
from lora_jax.methods import Adapter
from lora_jax.methods.bank import Bank


def _name(adapter: Adapter) -> str:
    return getattr(adapter.method, "name", adapter.method)


def _flat_lora(adapters, what: str) -> dict[str, Adapter]:
    flat = rules.flatten(adapters)
    for path, a in flat.items():
        if _name(a) != "lora":
            raise ValueError(f"{what}: {path!r} is a {_name(a)!r} adapter; only plain LoRA "
                             "adapters can be banked or combined (merge other methods instead)")
    return flat


def _same_layout(path: str, layouts: Sequence[layers.Layout]) -> layers.Layout:
    first = layouts[0]
    for other in layouts[1:]:
        if other != first:
            raise ValueError(f"adapters for {path!r} were made for different kernels: "
                             f"{first.kernel_shape} (stack {first.n_stack}) and "
                             f"{other.kernel_shape} (stack {other.n_stack}); use one base model")
    return first


def _pad_rank(a, b, n_stack: int, rank: int):
    """Zero-pads A's last axis and B's rank axis (after the stack) to ``rank``."""
    pad_a = [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]
    pad_b = [(0, 0)] * b.ndim
    pad_b[n_stack] = (0, rank - b.shape[n_stack])
    return jnp.pad(a, pad_a), jnp.pad(b, pad_b)


def _slot(adapter: Adapter | None, layout: layers.Layout, rank: int, like: Adapter):
    """One slot's (A, s·B) padded to ``rank``; zeros for a missing adapter."""
    if adapter is None:
        a, b = like.params["a"], like.params["b"]
        stack = a.shape[: layout.n_stack]
        return (jnp.zeros(stack + layout.in_shape + (rank,), jnp.float32),
                jnp.zeros(stack + (rank,) + layout.out_shape, jnp.float32))
    a = adapter.params["a"].astype(jnp.float32)
    b = adapter.scale * adapter.params["b"].astype(jnp.float32)
    return _pad_rank(a, b, layout.n_stack, rank)


def stack_adapters(named: Mapping[str, object]) -> dict:
    """One bank from ``{name: adapters}``; slot i holds the i-th name's adapters.

    Adapters may have different ranks (zero-padded to the largest, per kernel: exact) and
    different targets (a slot without an adapter at a kernel is zero there). Each adapter's scale
    is folded into its B, so the bank has scale 1.

    Returns:
      A tree of bank ``Adapter`` nodes (method 'bank') with ``a`` (*stack, N, *in, R) and ``b``
      (*stack, N, R, *out). Use with ``lj.apply(model, params, bank, x, adapter_ids=ids)``.

    Example:
      >>> bank = lj.stack_adapters({"sort": a1, "add": a2, "copy": a3})
      >>> logits = lj.apply(model, params, bank, tokens, adapter_ids=jnp.array([0, 2, -1]))
    """
    if not named:
        raise ValueError("stack_adapters needs at least one adapter tree: {name: adapters}")
    flats = [_flat_lora(t, f"stack_adapters[{n!r}]") for n, t in named.items()]
    out = {}
    for path in sorted(set().union(*flats)):
        present = [f[path] for f in flats if path in f]
        layout = _same_layout(path, [a.layout for a in present])
        rank = max(a.rank for a in present)
        slots = [_slot(f.get(path), layout, rank, present[0]) for f in flats]
        a = jnp.stack([s[0] for s in slots], axis=layout.n_stack)
        b = jnp.stack([s[1] for s in slots], axis=layout.n_stack)
        out[path] = Adapter({"a": a, "b": b}, {}, Bank(), 1.0, layout)
    return rules.unflatten(out)


def set_slot(bank, slot: int, adapters) -> dict:
    """The bank with slot ``slot`` replaced by ``adapters`` (same shapes: no retracing).

    ``adapters`` may cover fewer kernels than the bank (the rest of the slot becomes zero) and
    lower ranks (zero-padded); a kernel the bank lacks or a larger rank needs a new
    ``stack_adapters``.
    """
    flat_bank, flat = rules.flatten(bank), _flat_lora(adapters, "set_slot")
    extra = sorted(set(flat) - set(flat_bank))
    if extra:
        raise ValueError(f"set_slot: the bank has no adapter at {extra}; rebuild it with "
                         "lj.stack_adapters to add kernels")
    out = {}
    for path, node in flat_bank.items():
        n, rank = node.layout.n_stack, node.params["a"].shape[-1]
        new = flat.get(path)
        if new is not None:
            _same_layout(path, [node.layout, new.layout])
            if new.rank > rank:
                raise ValueError(f"set_slot: {path!r} has rank {new.rank} > the bank's {rank}; "
                                 "rebuild the bank with lj.stack_adapters")
        a, b = _slot(new, node.layout, rank, node)
        params = {"a": _put(node.params["a"], a, slot, n), "b": _put(node.params["b"], b, slot, n)}
        out[path] = dataclasses.replace(node, params=params)
    return rules.unflatten(out)


def _put(stacked, value, slot: int, axis: int):
    index = (slice(None),) * axis + (slot,)
    return stacked.at[index].set(value.astype(stacked.dtype))


# ----------------------------------------------------------------------------- combine


def _svd_factors(delta, layout: layers.Layout, rank: int):
    """Best rank-``rank`` factors (A = U_r S_r, B = V_rᵀ) of a kernel-order delta."""
    stack = delta.shape[: layout.n_stack]
    w = layers.to_canonical(layout, delta).reshape(stack + (layout.d_in, layout.d_out))
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    a = u[..., :, :rank] * s[..., None, :rank]
    b = vh[..., :rank, :]
    return (a.reshape(stack + layout.in_shape + (rank,)),
            b.reshape(stack + (rank,) + layout.out_shape))


def combine(adapters_list: Sequence[object], weights: Sequence[float], how: str = "cat",
            rank: int | None = None) -> dict:
    """One LoRA (scale 1) from weighted adapters, as PEFT's ``add_weighted_adapter``.

    With s_i each adapter's scale and Δ = Σ w_i s_i A_i B_i the weighted sum of deltas:

    - ``'cat'``: A = [w_i s_i A_i] side by side, B = [B_i] stacked; rank Σ r_i; exactly Δ.
    - ``'svd'``: the truncated SVD of Δ at rank ``rank`` (default max r_i): the best rank-r
      approximation of Δ (Eckart–Young, in Frobenius norm), A = U_r S_r, B = V_rᵀ.
    - ``'linear'``: PEFT's definition, A = Σ c_i A_i and B = Σ c_i B_i with c_i = √(w_i s_i); it
      needs equal ranks and is NOT Δ in general (cross terms A_i B_j); with one adapter it is
      w s A B. Weights must be >= 0 here.

    A kernel that only some adapters adapt combines those. Returns an adapter tree.
    """
    if len(adapters_list) != len(weights) or not adapters_list:
        raise ValueError(f"combine: {len(adapters_list)} adapter trees but {len(weights)} weights; "
                         "pass one weight per tree")
    if how not in ("linear", "cat", "svd"):
        raise ValueError(f"combine: unknown how={how!r}; use 'linear', 'cat' or 'svd'")
    flats = [_flat_lora(t, "combine") for t in adapters_list]
    out = {}
    for path in sorted(set().union(*flats)):
        pairs = [(f[path], float(w)) for f, w in zip(flats, weights) if path in f]
        layout = _same_layout(path, [a.layout for a, _ in pairs])
        first = pairs[0][0]
        n = layout.n_stack
        f32 = lambda x: x.astype(jnp.float32)
        if how == "cat":
            a = jnp.concatenate([w * ad.scale * f32(ad.params["a"]) for ad, w in pairs], axis=-1)
            b = jnp.concatenate([f32(ad.params["b"]) for ad, _ in pairs], axis=n)
        elif how == "linear":
            ranks = {ad.rank for ad, _ in pairs}
            if len(ranks) > 1 or min(w for _, w in pairs) < 0:
                raise ValueError(f"combine(how='linear'): {path!r} has ranks {sorted(ranks)} and "
                                 f"weights {[w for _, w in pairs]}; 'linear' needs equal ranks and "
                                 "weights >= 0 (use 'cat' or 'svd')")
            c = [jnp.sqrt(w * ad.scale) for ad, w in pairs]
            a = sum(ci * f32(ad.params["a"]) for ci, (ad, _) in zip(c, pairs))
            b = sum(ci * f32(ad.params["b"]) for ci, (ad, _) in zip(c, pairs))
        else:
            delta = sum(w * ad.scale * layers.product(layout, ad.params["a"], ad.params["b"])
                        for ad, w in pairs)
            r = rank or max(ad.rank for ad, _ in pairs)
            if r > min(layout.d_in, layout.d_out):
                raise ValueError(f"combine(how='svd'): rank {r} > min(d_in, d_out) for {path!r}")
            a, b = _svd_factors(delta, layout, r)
        out[path] = Adapter({"a": a, "b": b}, {}, first.method, 1.0, layout, first.dropout)
    return rules.unflatten(out)

