"""MTL-LoRA (Yang et al., AAAI 2025): a shared A, task-specific Λ_t, task-mixed up-projections.

For an example of task t, in Flax's kernel layout (A: ``(*in, r)``, B_i: ``(r, *out)``):

    h = x W + s · drop(x) A Λ_t B̄_t,    B̄_t = Σ_i softmax(w_t / τ)_i B_i,    s = α / r

Parameters (every leaf carries the kernel's stacked axes first, so ``nn.scan`` slices them):
``a`` ``(*stack, *in, r)``; ``lam`` ``(*stack, T, r, r)`` (``(*stack, T, r)`` with ``diagonal``);
``b`` ``(*stack, n, r, *out)``; ``w`` ``(*stack, T, n)``. Hyperparameters (``lj.methods.mtl``):
``num_tasks`` T (required), ``num_up`` n (3), ``temperature`` τ (0.1; the paper uses 0.1 for
language, 0.8 for image-text), ``diagonal`` (False), ``mix_init`` ('kaiming' | 'uniform').

Inits follow the authors' ``mLoRALinear``: A as LoRA's default (U(±1/√d_in)); Λ_t = I (ones when
diagonal); B_i = 0; w ~ ``kaiming_uniform_(a=√5)`` on the (T, n) table, whose fan_in is n, i.e.
U(±1/√n) ('uniform': w = 0, equal mixing). Their Λ acts as ``h @ Λᵀ`` and B is stored (n, out, r):
to port a checkpoint, transpose both. An embedding's A ~ N(0, 1) (LoRA's A = 0 would never train).

The forward pass stays factored and routes per example with ``ctx.task_ids`` (batch,). Both Λ_t and
the mixing weights act in rank space, so they fold into one small per-task map
``R_t = Λ_t [m_t1 I … m_tn I]`` (r × n·r), and then ``A Λ_t B̄_t = A R_t B_cat`` with ``B_cat``
the B_i stacked along the rank axis (n·r × out). Per example we gather ``R[task_ids]``
(batch, r, n·r: a few KB) and run ONE up-projection of rank n·r through the layout's own einsum.
Why this over the alternatives, for batch 4–16, T ≤ 16, n = 3: gathering B̄ per example copies a
(batch, r, d_out) slab of B (batch copies of B, again as a gradient) and needs a per-example
batched matmul with its own einsum per layer kind; computing h·B_i for each i then mixing forms n
output-sized (batch, …, d_out) intermediates, kept for the backward pass. Mixing in rank space
keeps every intermediate rank-sized and works unchanged for dense, multi-axis DenseGeneral/Einsum
(any output axis order), conv and embed layouts; its price is n× LoRA's up-projection FLOPs,
still ~n·r/d_in (< 1% for typical sizes) of the base layer. Never a per-example d_in × d_out.

Task ids must lie in [0, T): eagerly (concrete ids) an out-of-range id raises; under ``jit`` ids
are traced, so the rows of out-of-range examples become NaN (loud, and local to those rows).

``merge``/``unmerge`` have no task, so they raise; use ``merge_task``/``unmerge_task`` on one
kernel or ``lj.merge(params, adapters, task=task)`` on a tree.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method, Run
from lora_jax.methods import lora


@dataclasses.dataclass(frozen=True)
class MTL(Method):
    """MTL-LoRA: ``num_tasks`` T (required), ``num_up`` n, ``temperature`` τ, ``diagonal`` Λ_t,
    ``mix_init`` ('kaiming' | 'uniform'), ``init_weights`` of A ('default' | 'gaussian'), and
    ``export_merged``: a training run also writes one merged model per task."""

    name: ClassVar[str] = "mtl"
    example_args: ClassVar[dict] = {"num_tasks": 3}
    num_tasks: int = 0
    num_up: int = 3
    temperature: float = 0.1
    diagonal: bool = False
    mix_init: str = "kaiming"
    init_weights: str = "default"
    export_merged: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_tasks < 1:
            raise ValueError(f"MTL-LoRA needs the number of tasks: lj.methods.mtl(num_tasks=T), "
                             f"got num_tasks={self.num_tasks}")
        if self.num_up < 1 or self.temperature <= 0:
            raise ValueError(f"MTL-LoRA needs num_up >= 1 and temperature > 0; got "
                             f"{self.num_up}, {self.temperature}")
        if self.mix_init not in ("kaiming", "uniform"):
            raise ValueError(f"unknown mix_init {self.mix_init!r}; use 'kaiming' or 'uniform'")
        if self.init_weights not in ("default", "gaussian"):
            raise ValueError(f"MTL-LoRA supports init_weights 'default' or 'gaussian', not "
                             f"{self.init_weights!r}")

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        num_tasks, n, (ka, kw) = self.num_tasks, self.num_up, jax.random.split(key)
        stack = kernel.shape[: layout.n_stack]
        if layout.kind == "embed":
            a = jax.random.normal(ka, stack + layout.in_shape + (rank,))
        else:
            a, _ = lora.init_factors(ka, kernel, layout, rank, scale, self.init_weights)
        if self.diagonal:
            lam = jnp.ones(stack + (num_tasks, rank))
        else:
            lam = jnp.broadcast_to(jnp.eye(rank), stack + (num_tasks, rank, rank))
        if self.mix_init == "kaiming":
            bound = 1.0 / math.sqrt(n)
            w = jax.random.uniform(kw, stack + (num_tasks, n), minval=-bound, maxval=bound)
        else:
            w = jnp.zeros(stack + (num_tasks, n))
        b = jnp.zeros(stack + (n, rank) + layout.out_shape)
        return Adapter({"a": a, "lam": lam, "b": b, "w": w}, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        return output(y, x, adapter, kernel, bias, module, ctx)

    def merge(self, kernel, adapter):
        raise ValueError("MTL-LoRA merges one task at a time: call "
                         "lj.merge(params, adapters, task=task)")

    def unmerge(self, kernel, adapter):
        raise ValueError("MTL-LoRA unmerges one task at a time: call "
                         "lj.unmerge(params, adapters, task=task)")

    def merge_task(self, kernel, adapter, task):
        return merge_task(kernel, adapter, task)

    def unmerge_task(self, kernel, adapter, task):
        return unmerge_task(kernel, adapter, task)

    def leaf_axes(self, adapter):
        return {"a": ("stack", "in", None), "b": ("stack", None, None, "out"),
                "lam": ("stack", "rest"), "w": ("stack", "rest")}

    def callback(self, run: Run):
        return TaskExport(run.tasks) if self.export_merged else None


@dataclasses.dataclass
class TaskExport:
    """A training callback that writes one merged model per task (``merged/<task>/``, read with
    ``io.load_params``)."""

    tasks: tuple[str, ...]

    def restore(self, step, frozen):
        return frozen

    def __call__(self, step, trainable, frozen):
        return frozen

    def finish(self, trainable, frozen, workdir) -> dict:
        """Every process: each task's merge under jit, sharded like the base, each process
        writing its shards (``io.save_params``)."""
        from lora_jax import io, sharding, transform

        adapters = transform.join(trainable, frozen["state"])
        for t, name in enumerate(self.tasks):
            io.save_params(Path(workdir) / "merged" / name,
                           sharding.merge_sharded(frozen["params"], adapters, task=t))
        return {}


def task_maps(adapter: Adapter) -> jax.Array:
    """``R_t = Λ_t [m_t1 I … m_tn I]`` for every task: ``(*stack, T, r, n·r)``, float32."""
    p = adapter.params
    lam = p["lam"].astype(jnp.float32)
    if adapter.method.diagonal:
        lam = lam[..., :, None] * jnp.eye(lam.shape[-1])
    mix = jax.nn.softmax(p["w"].astype(jnp.float32) / adapter.method.temperature, axis=-1)
    r = jnp.einsum("...trs,...ti->...tris", lam, mix)
    return r.reshape(r.shape[:-2] + (-1,))


def _stacked_b(adapter: Adapter) -> jax.Array:
    """The B_i stacked along the rank axis: ``(*stack, n·r, *out)``."""
    b, n_out = adapter.params["b"], len(adapter.layout.out_shape)
    return b.reshape(b.shape[: b.ndim - n_out - 2] + (-1,) + b.shape[b.ndim - n_out:])


def _check_task_ids(ids, num_tasks: int, batch: int):
    if ids is None:
        raise ValueError("MTL-LoRA needs task_ids: lj.apply(..., task_ids=...)")
    if jnp.ndim(ids) != 1 or jnp.shape(ids)[0] != batch:
        raise ValueError(f"task_ids must have shape (batch,) = ({batch},), got {jnp.shape(ids)}; "
                         "MTL-LoRA needs the batch axis first in every adapted layer's input")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"task_ids must be integers, got {jnp.result_type(ids)}")
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)
        bad = bad[(bad < 0) | (bad >= num_tasks)]
        if bad.size:
            raise ValueError(f"task ids {sorted(set(bad.tolist()))} outside [0, {num_tasks}): "
                             f"this adapter was made with num_tasks={num_tasks}")


def output(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    """``y + s · drop(x) A R_t B_cat`` per example, t = ``ctx.task_ids`` (see the module doc)."""
    p, layout = adapter.params, adapter.layout
    h = layers.down(layout, x, p["a"], module)  # (batch, ..., r)
    num_tasks = adapter.method.num_tasks
    _check_task_ids(ctx.task_ids, num_tasks, h.shape[0])
    ids = jnp.asarray(ctx.task_ids)
    maps = jnp.take(task_maps(adapter), ids, axis=0, mode="clip").astype(h.dtype)
    hm = jnp.einsum("b...r,brk->b...k", h, maps)  # (batch, ..., n·r)
    valid = ((ids >= 0) & (ids < num_tasks)).reshape((-1,) + (1,) * (hm.ndim - 1))
    hm = jnp.where(valid, hm, jnp.nan)  # traced out-of-range ids: NaN rows, never garbage
    delta = adapter.scale * layers.up(layout, hm, _stacked_b(adapter))
    return y + delta.astype(y.dtype)


def weight_delta(adapter: Adapter, task: int) -> jax.Array:
    """``s · A Λ_t B̄_t`` in the kernel's axis order, float32, stacked axes leading."""
    num_tasks = adapter.method.num_tasks
    if not 0 <= task < num_tasks:
        raise ValueError(f"task {task} outside [0, {num_tasks})")
    b = _stacked_b(adapter).astype(jnp.float32)
    stack, out = b.shape[: adapter.layout.n_stack], adapter.layout.out_shape
    b = b.reshape(stack + (b.shape[len(stack)], -1))
    b_task = jnp.einsum("...rk,...kd->...rd", task_maps(adapter)[..., task, :, :], b)
    b_task = b_task.reshape(stack + (b_task.shape[-2],) + out)
    return adapter.scale * layers.product(adapter.layout, adapter.params["a"], b_task)


def merge_task(kernel, adapter: Adapter, task: int):
    """``W_t = W + s · A Λ_t B̄_t``: the kernel specialised to ``task``."""
    return (kernel.astype(jnp.float32) + weight_delta(adapter, task)).astype(kernel.dtype)


def unmerge_task(kernel, adapter: Adapter, task: int):
    """Inverse of ``merge_task``."""
    return (kernel.astype(jnp.float32) - weight_delta(adapter, task)).astype(kernel.dtype)
