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

import dataclasses
import re
from typing import ClassVar

import jax
import jax.numpy as jnp

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method, Run
from lora_jax.methods import lora


def masked_delta(adapter: Adapter, params=None, state=None) -> jax.Array:
    """``s · M ⊙ (A diag(m_r) B)`` in canonical order ``(*stack, *in, *out)``, float32."""
    p = adapter.params if params is None else params
    st = adapter.state if state is None else state
    layout = adapter.layout
    _, ins, outs, _ = layers.dense_axes(layout)
    rm = st["rank_mask"]
    rm = jnp.expand_dims(rm, tuple(range(rm.ndim - 1, rm.ndim - 1 + len(ins))))
    a = p["a"].astype(jnp.float32) * rm
    d = jnp.einsum(f"...{ins}R,...R{outs}->...{ins}{outs}", a, p["b"].astype(jnp.float32))
    return jnp.where(layers.to_canonical(layout, st["mask"]), adapter.scale * d, 0.0)


def output(y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
    x_spec, ins, outs, y_spec = layers.dense_axes(adapter.layout)
    contract = f"{x_spec},{ins}{outs}->{y_spec}"
    dropped = ctx.dropout_active(adapter)  # then x differs from the base layer's input

    low_precision = jnp.dtype(y.dtype).itemsize < 4

    def adapted(x, params, state, kernel):
        d = masked_delta(adapter, params, state)
        if dropped:
            return jnp.einsum(contract, x, d.astype(x.dtype))
        w = layers.to_canonical(adapter.layout, kernel.astype(jnp.float32))
        if low_precision:  # W + s·Δ rounded to bf16 would lose Δ against |W|: keep them apart
            return (jnp.einsum(contract, x, w.astype(x.dtype)).astype(jnp.float32)
                    + jnp.einsum(contract, x, d.astype(x.dtype)).astype(jnp.float32))
        return jnp.einsum(contract, x, (w + d).astype(x.dtype))

    if adapter.method.remat:
        adapted = jax.checkpoint(adapted)
    out = adapted(x.astype(y.dtype), adapter.params, adapter.state, kernel).astype(y.dtype)
    if dropped:
        return y + out
    return out if bias is None else out + bias.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoSA(Method):
    """LoSA: sparse adapters on a base pruned by a schedule during training (docs/losa.md).

    ``target`` final sparsity S (0: no pruning), ``pruner`` ('magnitude' | 'wanda' |
    'sparsegpt'), ``iterations`` T, ``pattern`` ('' or 'n:m'), ``beta`` (RMI temperature),
    ``layerwise`` (RMI layer-wise rates, else uniform), ``rank_start`` / ``rank_step`` (mean rank
    of iteration 1 and its increment), ``dynamic_rank`` (ranks from reconstruction errors, else
    r_max everywhere), ``masked`` (adapters masked by the base's sparsity; False: plain LoRA on
    the pruned base), ``calib_samples`` (calibration sequences from the training set), ``remat``
    (recompute the masked product in the backward pass).

    Deviations from the reference code (wzhuang-xmu/LoSA), each an option whose reference value
    ``configs/losa.py:variant=reference`` sets: ``rank_cap`` (the reference builds r = 8 adapters
    and slices ``lora_A[:rank]``, so every allocated rank above 8 is capped at 8; 0 here = no
    cap, ranks up to r_max), ``mask_from`` ('pruner': the pruner's keep-mask, so an adapter may
    regrow an earlier zero when a layer's rate drops; 'nonzero': the reference's ``W != 0``, so
    earlier zeros stay frozen), and the adapter dropout (0.1 in the reference, ``adapter.dropout``
    here, default 0). ``beta`` does not change the result: the exact LP's solution depends only
    on the order of the importances, which ``exp(-beta * r)`` keeps for every beta > 0 (the
    reference's inexact SLSQP solve is where its beta = 100 matters); it is kept for the record.
    """

    name: ClassVar[str] = "losa"
    target: float = 0.0
    pruner: str = "wanda"
    iterations: int = 5
    pattern: str = ""
    beta: float = 1.0
    layerwise: bool = True
    rank_start: int = 6
    rank_step: int = 1
    dynamic_rank: bool = True
    masked: bool = True
    calib_samples: int = 64
    init_weights: str = "default"
    remat: bool = True
    rank_cap: int = 0
    mask_from: str = "pruner"

    def __post_init__(self):
        super().__post_init__()
        if self.mask_from not in ("pruner", "nonzero"):
            raise ValueError(f"losa: mask_from must be 'pruner' or 'nonzero', got "
                             f"{self.mask_from!r}")
        if self.rank_cap < 0:
            raise ValueError(f"losa: rank_cap must be >= 0 (0: no cap), got {self.rank_cap}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"losa: target sparsity must be in [0, 1), got {self.target}")
        if self.pruner not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"losa: unknown pruner {self.pruner!r}; use 'magnitude', 'wanda' "
                             "or 'sparsegpt'")
        if self.pattern and not re.fullmatch(r"\d+:\d+", self.pattern):
            raise ValueError(f"losa: pattern must be '' or 'n:m' (e.g. '2:4'), got "
                             f"{self.pattern!r}")
        if self.iterations < 1:
            raise ValueError(f"losa: iterations must be >= 1, got {self.iterations}")

    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        if layout.kind != "dense":
            raise ValueError(f"sparse (LoSA) adapters support Dense/DenseGeneral/Einsum kernels, "
                             f"not {layout.kind!r} (kernel {layout.kernel_shape}); exclude it "
                             "from targets")
        a, b = lora.init_factors(key, kernel, layout, rank, scale, self.init_weights)
        stack = kernel.shape[: layout.n_stack]
        state = {"mask": kernel != 0, "rank_mask": jnp.ones(stack + (rank,), jnp.float32)}
        return Adapter({"a": a, "b": b}, state, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx):
        return output(y, x, adapter, kernel, bias, module, ctx)

    def merge(self, kernel, adapter):
        d = layers.from_canonical(adapter.layout, masked_delta(adapter))
        return (kernel.astype(jnp.float32) + d).astype(kernel.dtype)

    def unmerge(self, kernel, adapter):
        d = layers.from_canonical(adapter.layout, masked_delta(adapter))
        return (kernel.astype(jnp.float32) - d).astype(kernel.dtype)

    def leaf_axes(self, adapter):
        return {**lora.AXES, "mask": ("stack", "kernel"), "rank_mask": ("stack", None)}

    def callback(self, run: Run):
        if not self.target and not self.pattern:
            return None
        from lora_jax.sparsity import schedule

        return schedule.trainer_hook(self, run)
