"""Adapter methods behind one small protocol, and the ``Adapter`` pytree node they share.

Each method is a module (or, for the multi-task baselines in ``multi.py``, a namespace) with four
pure functions:

    init(key, kernel, layout, rank, scale, options) -> Adapter   # for one (possibly stacked) kernel
    output(y, x, adapter, kernel, bias, module, ctx) -> y'        # the adapted layer output
    merge(kernel, adapter) -> kernel'                             # fold the adapter in
    unmerge(kernel', adapter) -> kernel                           # take it out again

``output`` receives the base layer's output ``y`` (bias included) and the layer input ``x`` after
the adapter's dropout, for ONE layer (under ``nn.scan`` stacked axes are already sliced off), and
returns the adapted output. A LoRA-like method returns ``y + delta``; DoRA rescales. ``ctx``
carries what varies per call (train/eval, per-example task ids). Methods that need more per-layer
state (masks, rank masks, task tables) keep it in ``Adapter.state`` (never trained) and say so.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax

from lora_jax.layers import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """One kernel's adapter.

    Attributes:
      params: trainable arrays, e.g. ``{'a': (*stack, *in, r), 'b': (*stack, r, *out)}``.
      state: non-trainable arrays (masks, base norms); split off by ``lj.split``.
      method: name of the method module that owns the math ('lora', 'dora', 'full', ...).
      scale: the adapter scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
      layout: static kernel layout (axes, stacked axes, einsum strings).
      dropout: dropout rate on the adapter branch's input.
      options: method-specific static options, as a tuple of (name, value) pairs.
    """

    params: dict[str, Any]
    state: dict[str, Any]
    method: str = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    options: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return self.params["a"].shape[-1] if "a" in self.params else 0

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Per-call context: train mode and per-example routing (task ids, shape (batch,))."""

    train: bool = False
    task_ids: Any = None
    adapter_ids: Any = None  # (batch,) bank slots for methods/bank.py, -1 = base only


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def get(name: str) -> ModuleType:
    """The method module called ``name``."""
    from lora_jax.methods import bank, dora, full, lora, mtl, multi, sparse

    registry = {"lora": lora, "dora": dora, "full": full, "mtl": mtl, "losa": sparse,
                "per_task": multi.per_task, "multilora": multi.multilora, "bank": bank}
    if name not in registry:
        raise ValueError(f"unknown adapter method {name!r}; known: {sorted(registry)}")
    return registry[name]

