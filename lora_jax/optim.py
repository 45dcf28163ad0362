"""Optimisers over adapters: ``optax.multi_transform`` over labels, LoRA+ learning-rate groups.

Gradients are taken with respect to the adapter tree only (the frozen base is a closed-over
argument of the loss), so the base gets neither gradient buffers nor optimizer state. Within the
adapter tree, leaves are labelled:

- ``'b'``: LoRA's B factors, when ``lora_plus_ratio`` is set (LoRA+: B learns ``ratio`` times
  faster; the update after ``tx`` is scaled, which for Adam(W) equals scaling B's learning rate);
- ``'frozen'``: non-trainable adapter state (``Adapter.state``), given ``optax.set_to_zero`` and
  so no optimizer state;
- ``'default'``: everything else.
"""

from __future__ import annotations

import jax
import optax
from jax.tree_util import DictKey, GetAttrKey


def _label(path, lora_plus: bool) -> str:
    names = [k.name if isinstance(k, GetAttrKey) else getattr(k, "key", None) for k in path]
    if "state" in names and isinstance(path[names.index("state")], GetAttrKey):
        return "frozen"
    if lora_plus and isinstance(path[-1], DictKey) and path[-1].key == "b" and "params" in names:
        return "b"
    return "default"


def adapter_labels(tree, lora_plus: bool = False):
    """The label of every leaf of an adapter tree (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _label(p, lora_plus), tree)


def adapter_optimizer(
    tx: optax.GradientTransformation,
    adapters,
    *,
    lora_plus_ratio: float | None = None,
) -> optax.GradientTransformation:
    """``tx`` for adapters, with LoRA+ groups and no state for frozen adapter state.

    Args:
      tx: the base optimizer, e.g. ``optax.adamw(1e-3)``.
      adapters: the tree that will be optimised (``lj.init_adapters`` output, or the trainable
        half of ``lj.split``); used to check that the labels make sense.
      lora_plus_ratio: LoRA+'s η_B/η_A (the paper suggests 16); None disables it.
    Returns:
      An ``optax.multi_transform`` whose labels are computed from the tree it is given.
    """
    lora_plus = lora_plus_ratio is not None
    if lora_plus and "b" not in jax.tree.leaves(adapter_labels(adapters, True)):
        raise ValueError("lora_plus_ratio is set but the adapters have no B factors")
    transforms = {"default": tx, "frozen": optax.set_to_zero()}
    if lora_plus:
        transforms["b"] = optax.chain(tx, optax.scale(lora_plus_ratio))
    return optax.multi_transform(transforms, lambda tree: adapter_labels(tree, lora_plus))
