"""NNX models: the same adapters and the same adapter math, applied in materialised form.

Linen models get adapters injected by method interception (``lj.apply``). NNX modules are Python
objects with no interception hook, so here an NNX model is adapted by merging: its ``nnx.Param``
state is read as a plain tree, ``lj.merge`` folds the adapters in with the very ``merge`` function
of each method (LoRA, DoRA, ...), and the model is called on the merged state. Gradients flow into
A and B through the merge. Cost: one dense ``s·A B`` per adapted kernel per call, which is fine
for research-scale NNX models; for factored training at scale use a linen model.

    adapters = lj.init_adapters(lj.nnx.params(model), spec, key, layouts=lj.nnx.layouts(model))
    y = lj.nnx.apply(model, adapters, x)
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from lora_jax import layers, rules, transform


def _path(keys) -> str:
    return "/".join(str(k) for k in keys)


def _to_str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _to_str_keys(v) for k, v in tree.items()}
    return tree


def params(model: nnx.Module) -> dict[str, Any]:
    """The model's ``nnx.Param`` values as a nested dict with string keys."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    return _to_str_keys(nnx.to_pure_dict(state))


def layouts(model: nnx.Module) -> dict[str, layers.Layout]:
    """Kernel layouts of every ``nnx.Linear``, ``nnx.Einsum`` and ``nnx.Embed`` in ``model``."""
    found = {}
    for keys, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            found[_path(keys) + "/kernel"] = layers.dense_layout(node.kernel.value.shape, 1)
        elif isinstance(node, nnx.Einsum):
            found[_path(keys) + "/kernel"] = layers.einsum_layout(node.einsum_str,
                                                                  node.kernel.value.shape)
        elif isinstance(node, nnx.Embed):
            found[_path(keys) + "/embedding"] = layers.embed_layout(node.embedding.value.shape)
    return found


def apply(model: nnx.Module, adapters, *args, **kwargs):
    """Calls ``model(*args, **kwargs)`` with ``adapters`` merged into its parameters.

    The model object itself is left unchanged.
    """
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    flat = rules.flatten(transform.merge(params(model), adapters))

    def fill(tree, prefix):
        return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
                for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state), ""))
    return nnx.merge(graphdef, state, rest)(*args, **kwargs)
