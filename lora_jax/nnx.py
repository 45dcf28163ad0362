"""NNX models: the same adapters and the same adapter math as linen, factored or merged.

NNX modules are Python objects with no method-interception hook, so the factored path is module
substitution: ``apply`` copies the model's graph (the copy shares the base arrays) and replaces
every adapted ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Embed`` and
``nnx.Conv`` by an ``Adapted`` wrapper that calls the original module for the base output and
then the adapter method's own ``output`` (``y + s·xAB`` for LoRA, DoRA's rescaling, ...), which
reaches ``x·A`` and ``h·B`` through ``layers.down`` / ``layers.up``. So no call pays a dense
``W + s·A B``. ``merge`` / ``unmerge`` fold adapters into a copy of the model and out again (the
materialised mode, and what to ship). Layouts come from the modules themselves (``layouts``), not
from ``lj.trace_layouts``, which traces linen models only. Adapter init, rules and the methods'
math are shared with linen and live elsewhere.

    adapters = lj.init_adapters(lj.nnx.params(model), spec, key, layouts=lj.nnx.layouts(model))
    y = lj.nnx.apply(model, adapters, x)            # factored
    merged = lj.nnx.merge(model, adapters)          # an nnx.Module with W + s·A B folded in
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from lora_jax import layers, methods, rules, transform
from lora_jax.methods.saved import Saved

ADAPTABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)


def _path(keys, name: str = "") -> str:
    """'/'-joined keys, then ``name``: ('layers', 0), 'kernel' -> 'layers/0/kernel'."""
    return "/".join([str(k) for k in keys] + ([name] if name else []))


def _to_str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _to_str_keys(v) for k, v in tree.items()}
    return tree


def params(model: nnx.Module) -> dict[str, Any]:
    """The model's ``nnx.Param`` values as a nested dict with string keys."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    return _to_str_keys(nnx.to_pure_dict(state))


def _kernel_name(node) -> str:
    return "embedding" if isinstance(node, nnx.Embed) else "kernel"


def layout_of(node: nnx.Module, path: str = "") -> layers.Layout | None:
    """The kernel layout of one NNX layer, or None for a layer adapters cannot adapt.

    Raises for a ``LinearGeneral`` with batch axes or non-negative ``axis`` (its input axes then
    depend on the input's rank), naming the layer.
    """
    if isinstance(node, nnx.Embed):
        return layers.embed_layout(node.embedding.value.shape)
    if isinstance(node, nnx.Einsum):
        return layers.einsum_layout(node.einsum_str, node.kernel.value.shape)
    if isinstance(node, nnx.Conv):
        if node.feature_group_count != 1 or node.mask is not None:
            return None
        return layers.conv_layout(node.kernel.value.shape)
    if isinstance(node, nnx.LinearGeneral):
        axis = node.axis if isinstance(node.axis, tuple) else (node.axis,)
        if node.batch_axis or any(a >= 0 for a in axis):
            raise ValueError(
                f"nnx.LinearGeneral at {path!r}: axis={node.axis}, batch_axis="
                f"{dict(node.batch_axis)} cannot be adapted; use negative `axis` values (e.g. "
                "axis=(-2, -1)) and no batch_axis, or exclude the layer from the targets.")
        return layers.dense_layout(node.kernel.value.shape, len(axis), axis)
    if isinstance(node, nnx.Linear):
        return layers.dense_layout(node.kernel.value.shape, 1)
    return None


def layouts(model: nnx.Module) -> dict[str, layers.Layout]:
    """Kernel layouts of every adaptable layer in ``model``: ``{'path/kernel': Layout}``.

    NNX's counterpart of ``lj.trace_layouts`` (no trace needed: NNX layers are objects). Pass it
    as ``lj.init_adapters(lj.nnx.params(model), spec, key, layouts=lj.nnx.layouts(model))``.
    """
    found = {}
    for keys, node in nnx.iter_graph(model):
        if isinstance(node, ADAPTABLE):
            layout = layout_of(node, _path(keys))
            if layout is not None:
                found[_path(keys, _kernel_name(node))] = layout
    return found


def _linen_conv(conv: nnx.Conv) -> nn.Conv:
    """A linen ``nn.Conv`` with ``conv``'s geometry: what ``layers.down`` runs ``x·A`` through."""
    return nn.Conv(features=conv.out_features, kernel_size=conv.kernel_size,
                   strides=conv.strides, padding=conv.padding,
                   input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
                   use_bias=conv.use_bias, dtype=conv.dtype, precision=conv.precision)


class Adapted(nnx.Module):
    """An adapted layer: ``base(x)`` and then the adapter method's ``output`` (factored).

    ``base`` is the original NNX layer (its parameters stay where they were), ``adapter`` one
    ``Adapter`` for its kernel (per-layer, no stacked axes), ``ctx`` the call's ``methods.Ctx``;
    ``key`` drives the adapter's dropout when ``ctx.train``.
    """

    def __init__(self, base: nnx.Module, adapter: methods.Adapter, ctx: methods.Ctx,
                 key: jax.Array | None, path: str):
        self.base = base
        self.adapter = nnx.data(adapter)
        self.ctx = ctx
        self.key = nnx.data(key)
        self.path = path

    def __call__(self, x, *args, **kwargs):
        base, adapter = self.base, self.adapter
        kernel = getattr(base, _kernel_name(base)).value
        if tuple(kernel.shape) != adapter.layout.kernel_shape:
            raise ValueError(f"adapter for {self.path!r} was made for a kernel of shape "
                             f"{adapter.layout.kernel_shape}, but the layer's kernel has shape "
                             f"{kernel.shape}")
        y = base(x, *args, **kwargs)
        if self.ctx.train and adapter.dropout > 0 and adapter.layout.kind != "embed":
            if self.key is None:
                raise ValueError(f"{self.path!r} has adapter dropout {adapter.dropout} and "
                                 "train=True: pass key=jax.random.key(...) to lj.nnx.apply.")
            keep = jax.random.bernoulli(self.key, 1.0 - adapter.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - adapter.dropout), 0).astype(x.dtype)
        bias = getattr(base, "bias", None)
        bias = None if bias is None else bias.value
        module = _linen_conv(base) if isinstance(base, nnx.Conv) else base
        return adapter.method.output(y, x, adapter, kernel, bias, module, self.ctx)

    def attend(self, query):
        """A tied output head reads the adapted table (merged), so factored == merged holds."""
        table = self.adapter.method.merge(self.base.embedding.value, self.adapter)
        dtype = self.base.dtype or jnp.result_type(query, table)
        return jnp.dot(query.astype(dtype), table.astype(dtype).T)


_CONTAINERS = (nnx.List, nnx.Dict, list, dict)


def _child(parent, key):
    return parent[key] if isinstance(parent, _CONTAINERS) else getattr(parent, str(key))


def _set_child(parent, key, value):
    if isinstance(parent, _CONTAINERS):
        parent[key] = value
    else:
        setattr(parent, str(key), value)


def _split_saved(adapters):
    """({path: low-rank adapter}, modules_to_save deltas as a tree): the latter are added to the
    parameters, never substituted."""
    flat = rules.flatten(adapters)
    low = {p: a for p, a in flat.items() if not isinstance(a.method, Saved)}
    saved = {p: a for p, a in flat.items() if isinstance(a.method, Saved)}
    return low, rules.unflatten(saved)


def _with_params(model: nnx.Module, new_params: dict) -> nnx.Module:
    """A copy of ``model`` whose ``nnx.Param`` values are ``new_params`` (same structure)."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    flat = rules.flatten(new_params)

    def fill(tree, prefix):
        return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
                for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state), ""))
    return nnx.merge(graphdef, state, rest)


def adapted(model: nnx.Module, adapters, *, train: bool = False,
            task_ids: jax.Array | None = None, key: jax.Array | None = None) -> nnx.Module:
    """A copy of ``model`` with each adapted layer replaced by an ``Adapted`` wrapper.

    modules_to_save deltas are added to the copy's parameters. The original model is left
    unchanged; the copy shares its base arrays. Stacked (scanned) kernels are not supported here:
    adapt the per-layer modules.
    """
    low, saved = _split_saved(adapters)
    model = _with_params(model, transform.merge(params(model), saved)) if saved else \
        nnx.clone(model)
    ctx = methods.Ctx(train=train, task_ids=task_ids)
    found = {}
    for keys, node in nnx.iter_graph(model):
        if isinstance(node, ADAPTABLE):
            found[_path(keys, _kernel_name(node))] = keys
    for i, (path, adapter) in enumerate(sorted(low.items())):
        if path not in found:
            raise ValueError(f"adapter for {path!r} has no nnx.Linear/LinearGeneral/Einsum/Embed/"
                             f"Conv layer at that path; adaptable layers: {sorted(found)[:8]}")
        if adapter.layout.n_stack:
            raise ValueError(f"adapter for {path!r} is stacked ({adapter.layout.n_stack} leading "
                             "axes); lj.nnx.apply adapts per-layer NNX modules only.")
        keys = found[path]
        layer_key = None if key is None else jax.random.fold_in(key, i)
        if not keys:  # the model is itself the adapted layer
            model = Adapted(model, adapter, ctx, layer_key, path)
            continue
        parent = model
        for k in keys[:-1]:
            parent = _child(parent, k)
        _set_child(parent, keys[-1], Adapted(_child(parent, keys[-1]), adapter, ctx, layer_key,
                                             path))
    return model


def apply(model: nnx.Module, adapters, *args, train: bool = False,
          task_ids: jax.Array | None = None, key: jax.Array | None = None, **kwargs):
    """Calls ``model(*args, **kwargs)`` with the adapters injected, in factored form.

    Args:
      model: an NNX module (left unchanged).
      adapters: from ``lj.init_adapters(lj.nnx.params(model), ..., layouts=lj.nnx.layouts(model))``.
      train: enables adapter dropout (then pass ``key``).
      task_ids: int array (batch,) for methods that route per example (MTL-LoRA).
    Returns:
      Whatever the model returns. A pure function of ``adapters``: differentiate and jit it.
    """
    return adapted(model, adapters, train=train, task_ids=task_ids, key=key)(*args, **kwargs)


def merge(model: nnx.Module, adapters, *, task: int | None = None) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel (``lj.merge``'s math)."""
    return _with_params(model, transform.merge(params(model), adapters, task=task))


def unmerge(model: nnx.Module, adapters, *, task: int | None = None) -> nnx.Module:
    """Inverse of ``merge``: a copy of ``model`` with the adapters taken out again."""
    return _with_params(model, transform.unmerge(params(model), adapters, task=task))


def transform_base(model: nnx.Module, adapters) -> tuple[nnx.Module, Any]:
    """``(model, adapters)`` to train on: ``lj.transform_base`` on a copy of the model (e.g.
    PiSSA's residual base ``W − s·A B``); identity for most methods."""
    new_params, adapters = transform.transform_base(params(model), adapters)
    return _with_params(model, new_params), adapters
