"""Optimisers over adapters: ``optax.multi_transform`` over the groups each method declares.

Gradients are taken with respect to the adapter tree only (the frozen base is a closed-over
argument of the loss), so the base gets neither gradient buffers nor optimizer state. Each
method names the optimizer group of its leaves (``Method.param_groups``):

- ``'default'``: the base optimizer ``tx``;
- ``'frozen'``: no update and no optimizer state (``optax.set_to_zero``); adapter *state* (masks,
  base norms, frozen factors) is always frozen;
- any other group: ``tx`` followed by the method's ``group_transform(group)`` (LoRA+: B's updates
  scaled by the ratio, which for Adam(W) equals scaling B's learning rate).

Then each method may wrap the whole transformation (``Method.wrap_optimizer``, e.g. AdaLoRA's
importance and budget masking). Gradient clipping belongs OUTSIDE this transformation
(``optax.chain(optax.clip_by_global_norm(c), adapter_optimizer(tx, adapters))``), so it clips
once over every trainable leaf, not per group.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from lora_jax.methods import is_adapter, methods_of


def _labels_of(adapter) -> object:
    groups = adapter.method.param_groups(adapter)
    tag = lambda g: g if g in ("default", "frozen") else f"{adapter.method!r}/{g}"
    return dataclasses.replace(
        adapter, params={k: tag(groups.get(k, "default")) for k in adapter.params},
        state={k: "frozen" for k in adapter.state})


def adapter_labels(tree):
    """The optimizer group label of every leaf of an adapter tree (see the module docstring)."""
    return jax.tree.map(lambda a: _labels_of(a) if is_adapter(a) else "default", tree,
                        is_leaf=is_adapter)


def adapter_optimizer(tx: optax.GradientTransformation, adapters) -> optax.GradientTransformation:
    """``tx`` for adapters, with each method's optimizer groups and wrapper.

    Args:
      tx: the base optimizer, e.g. ``optax.adamw(1e-3)`` (no clipping inside: see above).
      adapters: the tree that will be optimised (``lj.init_adapters`` output, or the trainable
        half of ``lj.split``); its methods declare the groups.
    Returns:
      An ``optax.multi_transform`` whose labels are computed from the tree it is given, wrapped
      by the methods that wrap the optimizer.
    """
    transforms = {"default": tx, "frozen": optax.set_to_zero()}
    for a in jax.tree.leaves(adapters, is_leaf=is_adapter):
        if not is_adapter(a):
            continue
        for group in set(a.method.param_groups(a).values()) - {"default", "frozen"}:
            transforms[f"{a.method!r}/{group}"] = optax.chain(tx, a.method.group_transform(group))
    out = optax.multi_transform(transforms, adapter_labels)
    for method in methods_of(adapters):
        out = method.wrap_optimizer(out)
    return out
