"""Multi-task baselines for MTL-LoRA: one LoRA per task ('per_task') and MultiLoRA ('multilora').

Both keep n (or T) LoRAs side by side and run them as ONE LoRA of rank n·r through the layout's own
einsums: the A_i concatenated along the rank axis (``A_cat``, ``(*in, n·r)``) and the B_i stacked
(``B_cat``, ``(n·r, *out)``), so ``x A_cat B_cat = Σ_i x A_i B_i`` and every layer kind (dense,
multi-axis DenseGeneral/Einsum, conv, embed) works unchanged. Leaves carry stacked axes first, then
the module axis: ``a`` ``(*stack, n, *in, r)``, ``b`` ``(*stack, n, r, *out)``.

**per_task** (``num_tasks`` T): T independent LoRAs, example b uses LoRA ``task_ids[b]``:

    h = x W + s · drop(x) A_t B_t,   s = α / r

Routing zeroes the other tasks' blocks of the rank-T·r activation ``x A_cat`` per example, so an
example's output (and its gradient) involves only its own task's A_t, B_t. Its price is T× LoRA's
adapter FLOPs (the same as one LoRA of rank T·r, i.e. as LoRA at an equal parameter count); for
many tasks (T·r ≫ 64) gathering A_t per example would be cheaper. Inits are LoRA's per task
(PEFT's: A kaiming-uniform, B = 0; embeddings A = 0, B ~ N(0, 1)). Task ids are validated as
MTL-LoRA validates them (``mtl._check_task_ids``; NaN rows for out-of-range ids under ``jit``).
There is no task-free merge: ``lj.merge(params, adapters, task=t)``.

**multilora** (Wang et al. 2023, "MultiLoRA: Democratizing LoRA for Better Multi-Task
Learning"; ``num_loras`` n, default 3): n parallel LoRAs summed, with learnable scaling,
shared by all tasks (no routing; ``task_ids`` are ignored):

    h = x W + s · Σ_i (drop(x) A_i B_i) ⊙ λ_i,   λ_i ∈ R^{out} (per output unit),  s = α / r

As in the paper, B is not zero-initialised; the learnable scalings start at zero instead (so the
model starts as the base): A_i and B_i ~ kaiming-uniform(a=√5) (A: U(±1/√d_in), B: U(±1/√r); an
embedding's A ~ N(0, 1)), λ_i = 0. The per-output-unit λ_i and the inits follow the MultiLoRA
baseline in the MTL-LoRA authors' code (pUmpKin-Co/MTL-LoRA); each module keeps the full α/r, so
the update grows with n (no 1/n). λ folds into B (``B_i ⊙ λ_i``, B-sized), so the forward stays
one rank-n·r LoRA; ``merge`` is ``W + s · A_cat (B ⊙ λ)_cat``. With n = 1 and λ = 1 it is LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method, Run
from lora_jax.methods import lora, mtl


def _stack_inits(key, kernel, layout, rank, scale, init, n):
    """n LoRA factor pairs from ``lora.init_factors``, stacked on a new axis after the stack."""
    pairs = [lora.init_factors(k, kernel, layout, rank, scale, init)
             for k in jax.random.split(key, n)]
    return tuple(jnp.stack(f, axis=layout.n_stack) for f in zip(*pairs))


def _cat_a(a, layout) -> jax.Array:
    """``(..., n, *in, r)`` -> ``(..., *in, n·r)``: the A_i side by side on the rank axis."""
    axis = a.ndim - len(layout.in_shape) - 2
    a = jnp.moveaxis(a, axis, -2)
    return a.reshape(a.shape[:-2] + (-1,))


def _cat_b(b, layout) -> jax.Array:
    """``(..., n, r, *out)`` -> ``(..., n·r, *out)``: the B_i stacked on the rank axis."""
    n_out = len(layout.out_shape)
    return b.reshape(b.shape[: b.ndim - n_out - 2] + (-1,) + b.shape[b.ndim - n_out:])


def _product(adapter: Adapter, a, b) -> jax.Array:
    """``s · A_cat B_cat`` (summed over the modules) in the kernel's axis order, float32."""
    return adapter.scale * layers.product(adapter.layout, _cat_a(a, adapter.layout),
                                          _cat_b(b, adapter.layout))


# ----------------------------------------------------------------------------- per_task


def output_per_task(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    """``y + s · drop(x) A_t B_t`` per example, t = ``ctx.task_ids``."""
    p, layout, num_tasks = adapter.params, adapter.layout, adapter.method.num_tasks
    h = layers.down(layout, x, _cat_a(p["a"], layout), module)  # (batch, ..., T·r)
    mtl._check_task_ids(ctx.task_ids, num_tasks, h.shape[0])
    ids = jnp.asarray(ctx.task_ids)
    keep = jax.nn.one_hot(ids, num_tasks, dtype=h.dtype)  # zero row for an out-of-range id
    keep = jnp.where(((ids >= 0) & (ids < num_tasks))[:, None], keep, jnp.nan)
    keep = keep.reshape((-1,) + (1,) * (h.ndim - 2) + (num_tasks, 1))
    h = (h.reshape(h.shape[:-1] + (num_tasks, -1)) * keep).reshape(h.shape)
    delta = adapter.scale * layers.up(layout, h, _cat_b(p["b"], layout))
    return y + delta.astype(y.dtype)


def weight_delta_per_task(adapter: Adapter, task: int) -> jax.Array:
    """``s · A_t B_t`` in the kernel's axis order, float32, stacked axes leading."""
    num_tasks = adapter.method.num_tasks
    if not 0 <= task < num_tasks:
        raise ValueError(f"task {task} outside [0, {num_tasks})")
    n = adapter.layout.n_stack
    pick = lambda x: jax.lax.slice_in_dim(x, task, task + 1, axis=n)
    return _product(adapter, pick(adapter.params["a"]), pick(adapter.params["b"]))


def merge_task(kernel, adapter: Adapter, task: int):
    """``W_t = W + s · A_t B_t``: the kernel specialised to ``task``."""
    return (kernel.astype(jnp.float32) + weight_delta_per_task(adapter, task)).astype(kernel.dtype)


def unmerge_task(kernel, adapter: Adapter, task: int):
    """Inverse of ``merge_task``."""
    return (kernel.astype(jnp.float32) - weight_delta_per_task(adapter, task)).astype(kernel.dtype)


# ----------------------------------------------------------------------------- multilora


def _scaled_b(adapter: Adapter) -> jax.Array:
    """``B_i ⊙ λ_i``: ``(..., n, r, *out)``."""
    p, n_out = adapter.params, len(adapter.layout.out_shape)
    lam = jnp.expand_dims(p["lam"], p["lam"].ndim - n_out)  # (..., n, 1, *out)
    return p["b"] * lam.astype(p["b"].dtype)


def output_multilora(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    """``y + s · Σ_i (drop(x) A_i B_i) ⊙ λ_i``, as one rank-n·r LoRA."""
    layout = adapter.layout
    h = layers.down(layout, x, _cat_a(adapter.params["a"], layout), module)
    delta = adapter.scale * layers.up(layout, h, _cat_b(_scaled_b(adapter), layout))
    return y + delta.astype(y.dtype)


def weight_delta_multilora(adapter: Adapter) -> jax.Array:
    """``s · Σ_i A_i (B_i ⊙ λ_i)`` in the kernel's axis order, float32, stacked axes leading."""
    return _product(adapter, adapter.params["a"], _scaled_b(adapter))


def merge_multilora(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) + weight_delta_multilora(adapter)).astype(kernel.dtype)


def unmerge_multilora(kernel, adapter: Adapter):
    return (kernel.astype(jnp.float32) - weight_delta_multilora(adapter)).astype(kernel.dtype)


_STACKED = {"a": ("stack", None, "in", None), "b": ("stack", None, None, "out")}


def _check_init(name: str, init: str) -> None:
    if init not in ("default", "gaussian"):
        raise ValueError(f"{name} supports init_weights 'default' or 'gaussian', not {init!r}")


@dataclasses.dataclass(frozen=True)
class PerTask(Method):
    """One LoRA per task: ``num_tasks`` T (required); ``export_merged`` writes one merged model
    per task after training."""

    name: ClassVar[str] = "per_task"
    example_args: ClassVar[dict] = {"num_tasks": 3}
    num_tasks: int = 0
    init_weights: str = "default"
    export_merged: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_tasks < 1:
            raise ValueError(f"per-task LoRA needs lj.methods.per_task(num_tasks=T) with T >= 1, "
                             f"got {self.num_tasks}")
        _check_init(self.name, self.init_weights)

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        """``a`` (*stack, T, *in, r), ``b`` (*stack, T, r, *out)."""
        a, b = _stack_inits(key, kernel, layout, rank, scale, self.init_weights, self.num_tasks)
        return Adapter({"a": a, "b": b}, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx):
        return output_per_task(y, x, adapter, kernel, bias, module, ctx)

    def merge(self, kernel, adapter):
        raise ValueError("per-task LoRA merges one task at a time: call "
                         "lj.merge(params, adapters, task=task)")

    unmerge = merge

    def merge_task(self, kernel, adapter, task):
        return merge_task(kernel, adapter, task)

    def unmerge_task(self, kernel, adapter, task):
        return unmerge_task(kernel, adapter, task)

    def leaf_axes(self, adapter):
        return _STACKED

    def callback(self, run: Run):
        return mtl.TaskExport(run.tasks) if self.export_merged else None


@dataclasses.dataclass(frozen=True)
class MultiLoRA(Method):
    """MultiLoRA: ``num_loras`` n summed LoRAs with per-output-unit scalings."""

    name: ClassVar[str] = "multilora"
    num_loras: int = 3
    init_weights: str = "default"

    def __post_init__(self):
        super().__post_init__()
        if self.num_loras < 1:
            raise ValueError(f"MultiLoRA needs num_loras >= 1, got {self.num_loras}")
        _check_init(self.name, self.init_weights)

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        """``a`` (*stack, n, *in, r), ``b`` (*stack, n, r, *out), ``lam`` (*stack, n, *out) = 0."""
        n, (ka, kb) = self.num_loras, jax.random.split(key)
        a, _ = _stack_inits(ka, kernel, layout, rank, scale, self.init_weights, n)
        stack = kernel.shape[: layout.n_stack]
        if layout.kind == "embed":
            a = jax.random.normal(ka, a.shape)
        bound = 1.0 / math.sqrt(rank)
        b = jax.random.uniform(kb, stack + (n, rank) + layout.out_shape, minval=-bound,
                               maxval=bound)
        lam = jnp.zeros(stack + (n,) + layout.out_shape)
        return Adapter({"a": a, "b": b, "lam": lam}, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx):
        return output_multilora(y, x, adapter, kernel, bias, module, ctx)

    def merge(self, kernel, adapter):
        return merge_multilora(kernel, adapter)

    def unmerge(self, kernel, adapter):
        return unmerge_multilora(kernel, adapter)

    def leaf_axes(self, adapter):
        return {**_STACKED, "lam": ("stack", None, "out")}
