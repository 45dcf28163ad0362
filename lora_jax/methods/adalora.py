"""AdaLoRA (Zhang et al., ICLR 2023): LoRA in SVD form, ranks pruned by importance to a budget.

The update is ``s · P Λ Q``: P = ``a`` ``(*stack, *in, r)``, Λ = ``e`` ``(*stack, r)`` (init 0,
so the model starts as the base), Q = ``b`` ``(*stack, r, *out)`` (P and Q ~ N(0, 0.02²), PEFT's
init). The loss gets ``orth_reg_weight · Σ_layers (‖PᵀP − I‖² + ‖QQᵀ − I‖²)`` (the paper's sum;
PEFT averages unsquared norms over the matrices instead). Rank allocation is an optimizer wrapper
(``wrap_optimizer``) around the whole adapter optimizer, so it runs inside the jitted step and
never recompiles; it follows PEFT's ``RankAllocator`` step for step:

- importance of every entry of P, Λ, Q: ``I = |θ ∇θ|`` with θ after the optimizer's update,
  smoothed ``Ī ← β1 Ī + (1−β1) I`` and ``Ū ← β2 Ū + (1−β2) |I − Ī|``, score ``Ī·Ū``; a triplet's
  score is Λ_i's plus the means of P's column i and Q's row i (until the final phase);
- budget (total rank over all AdaLoRA layers; a stacked kernel counts each layer): the initial
  total up to step ``tinit``, then cubic down to ``target_rank`` × layers at step
  ``total_step − tfinal``, then fixed (``budget_schedule``);
- every ``delta_t`` steps of the budget phase, the λ whose triplet is not in the global top-budget
  (all layers together) are set to 0; at step ``total_step − tfinal`` the mask is fixed and then
  applied at every step.

The wrapper's state holds the step count, the two EMAs and the final mask.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import layers
from lora_jax.methods import Adapter, Ctx, Method, Run, is_adapter
from lora_jax.methods.lora import add


def budget_schedule(step: int, init: int, target: int, tinit: int, tfinal: int, total: int,
                    delta_t: int) -> tuple[int, bool]:
    """``(budget, mask now)`` at ``step``: PEFT's schedule (cubic from ``init`` to ``target``)."""
    if step <= tinit:
        return init, False
    if step > total - tfinal:
        return target, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init - target) * mul**3 + target), step % delta_t == 0


def _in_axes(adapter: Adapter, n_stack: int) -> tuple[int, ...]:
    return tuple(range(n_stack, n_stack + len(adapter.layout.in_shape)))


def scaled_p(adapter: Adapter, params=None):
    """``P diag(Λ)``, shape ``(*stack, *in, r)``."""
    p = adapter.params if params is None else params
    n = p["e"].ndim - 1
    return p["a"] * jnp.expand_dims(p["e"], _in_axes(adapter, n))


def triplet_scores(adapter: Adapter, score: dict) -> jax.Array:
    """A triplet's score from the entries' scores ``{'a', 'e', 'b'}``: shape ``(*stack, r)``."""
    n = score["e"].ndim - 1
    out_axes = tuple(range(n + 1, score["b"].ndim))
    return score["e"] + jnp.mean(score["a"], _in_axes(adapter, n)) + jnp.mean(score["b"], out_axes)


def keep_top(scores: list[jax.Array], drop: jax.Array) -> list[jax.Array]:
    """Which triplets survive when the ``drop`` lowest-scoring ones of all layers together go
    (PEFT's rule: everything at or below the drop-th smallest score goes; ``drop`` = 0: none)."""
    flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores]))
    threshold = jnp.where(drop > 0, flat[jnp.maximum(drop - 1, 0)], -jnp.inf)
    return [s > threshold for s in scores]


class Stats(NamedTuple):
    """Per AdaLoRA adapter (in tree order): EMAs of importance and uncertainty, final mask."""

    ema_ipt: tuple
    ema_unc: tuple
    final_keep: tuple


class AllocatorState(NamedTuple):
    inner: Any
    count: jax.Array
    stats: Stats


def _mine(method, tree) -> list[Adapter]:
    return [a for a in jax.tree.leaves(tree, is_leaf=is_adapter)
            if is_adapter(a) and a.method == method]


@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """AdaLoRA. The adapter rank is the initial rank (PEFT's ``init_r``); ``target_rank``: the
    final mean rank per layer (``target_r``); ``total_step``: the run's training steps (required);
    ``tinit`` / ``tfinal``: warm-up and final steps; ``delta_t``: steps between reallocations;
    ``beta1`` / ``beta2``: EMA factors; ``orth_reg_weight``: the regulariser's weight."""

    name: ClassVar[str] = "adalora"
    example_args: ClassVar[dict] = dict(target_rank=2, total_step=4, tinit=0, tfinal=1)
    target_rank: int = 8
    total_step: int = 0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.total_step <= 0:
            raise ValueError(f"{self.name}: total_step must be the run's number of training "
                             f"steps (> 0), got {self.total_step}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(f"{self.name}: tinit + tfinal ({self.tinit} + {self.tfinal}) must be "
                             f"< total_step ({self.total_step}), leaving a budget phase")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"{self.name}: beta1 and beta2 must be in (0, 1)")
        if self.delta_t < 1 or self.target_rank < 0 or self.orth_reg_weight < 0:
            raise ValueError(f"{self.name}: need delta_t >= 1, target_rank >= 0, "
                             "orth_reg_weight >= 0")

    # --- the math ----------------------------------------------------------------------------
    def init(self, key, kernel, layout, rank, scale, dropout) -> Adapter:
        if layout.kind == "embed":
            raise ValueError("AdaLoRA on an embedding table is not supported; target kernels only")
        if rank < self.target_rank:
            raise ValueError(f"{self.name}: the adapter rank {rank} (the initial rank) is below "
                             f"target_rank {self.target_rank}")
        stack = kernel.shape[: layout.n_stack]
        ka, kb = jax.random.split(key)
        params = {"a": 0.02 * jax.random.normal(ka, stack + layout.in_shape + (rank,)),
                  "e": jnp.zeros(stack + (rank,)),
                  "b": 0.02 * jax.random.normal(kb, stack + (rank,) + layout.out_shape)}
        return Adapter(params, {}, self, scale, layout, dropout)

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        h = layers.down(adapter.layout, x, scaled_p(adapter), module)
        return y + (adapter.scale * layers.up(adapter.layout, h, adapter.params["b"])).astype(
            y.dtype)

    def _delta(self, adapter):
        return adapter.scale * layers.product(adapter.layout, scaled_p(adapter),
                                              adapter.params["b"])

    def merge(self, kernel, adapter):
        return add(kernel, self._delta(adapter))

    def unmerge(self, kernel, adapter):
        return add(kernel, -self._delta(adapter))

    def leaf_axes(self, adapter):
        return {"a": ("stack", "in", None), "e": ("stack", None), "b": ("stack", None, "out")}

    def regularizer(self, adapter):
        """``w · Σ (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F)`` over the adapter's (stacked) layers."""
        p, r = adapter.params, adapter.params["e"].shape[-1]
        n = p["e"].ndim - 1
        a = p["a"].reshape(p["a"].shape[:n] + (-1, r))
        b = p["b"].reshape(p["b"].shape[:n] + (r, -1))
        eye = jnp.eye(r)
        pp = jnp.einsum("...ir,...is->...rs", a, a) - eye
        qq = jnp.einsum("...ri,...si->...rs", b, b) - eye
        return self.orth_reg_weight * (jnp.sum(pp**2) + jnp.sum(qq**2))

    # --- rank allocation ---------------------------------------------------------------------
    def budgets(self, init: int, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """``(budget, mask now)`` for steps 0..total_step (later steps use the last entry)."""
        rows = [budget_schedule(t, init, self.target_rank * n_layers, self.tinit, self.tfinal,
                                self.total_step, self.delta_t) for t in range(self.total_step + 1)]
        return (np.array([b for b, _ in rows], np.int32), np.array([m for _, m in rows]))

    def init_stats(self, adapters: list[Adapter]) -> Stats:
        zeros = lambda: tuple(jax.tree.map(jnp.zeros_like, a.params) for a in adapters)
        keep = tuple(jnp.ones(a.params["e"].shape, bool) for a in adapters)
        return Stats(zeros(), zeros(), keep)  # distinct buffers: the train step donates them

    def allocate(self, adapters: list[Adapter], grads: list[dict], stats: Stats, step):
        """One step of PEFT's ``update_and_allocate``.

        Args:
          adapters: this method's adapters, with their params after the optimizer's update.
          grads: their gradients (dicts like ``params``).
          stats: from the previous step (``init_stats`` at first).
          step: the step number (0 for the first update), an int32 scalar.
        Returns:
          ``(stats, drop, scores)``: per adapter, ``drop`` (bool ``(*stack, r)``) marks the λ to
          set to 0 now and ``scores`` the triplet scores the mask was taken from.
        """
        n_layers = sum(math.prod(a.params["e"].shape[:-1]) for a in adapters)
        init = sum(a.params["e"].size for a in adapters)
        budget, mask_now = (jnp.asarray(t) for t in self.budgets(init, n_layers))
        idx = jnp.minimum(step, self.total_step)
        final_step = self.total_step - self.tfinal
        track = step < final_step
        ema_ipt, ema_unc, scores = [], [], []
        for a, g, mi, mu in zip(adapters, grads, stats.ema_ipt, stats.ema_unc):
            ipt = {k: jnp.abs(a.params[k] * g[k]) for k in mi}
            new_i = {k: self.beta1 * mi[k] + (1 - self.beta1) * ipt[k] for k in mi}
            new_u = {k: self.beta2 * mu[k] + (1 - self.beta2) * jnp.abs(ipt[k] - new_i[k])
                     for k in mi}
            new_i = {k: jnp.where(track, new_i[k], mi[k]) for k in mi}
            new_u = {k: jnp.where(track, new_u[k], mu[k]) for k in mi}
            ema_ipt.append(new_i)
            ema_unc.append(new_u)
            scores.append(triplet_scores(a, {k: new_i[k] * new_u[k] for k in mi}))
        keep = keep_top(scores, init - budget[idx])
        final = tuple(jnp.where(step == final_step, k, f) for k, f in zip(keep, stats.final_keep))
        now = mask_now[idx] | (step == final_step)  # PEFT forces the final mask's step
        drop = [jnp.where(step > final_step, ~f, now & ~k) for k, f in zip(keep, final)]
        return Stats(tuple(ema_ipt), tuple(ema_unc), final), drop, scores

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx``, then this method's rank allocation (see the module docstring)."""

        def init_fn(params):
            return AllocatorState(tx.init(params), jnp.zeros((), jnp.int32),
                                  self.init_stats(_mine(self, params)))

        def update_fn(updates, state, params=None):
            if params is None:
                raise ValueError("AdaLoRA's optimizer needs the params: call "
                                 "tx.update(grads, state, params)")
            grads = [a.params for a in _mine(self, updates)]
            updates, inner = tx.update(updates, state.inner, params)
            ups = _mine(self, updates)
            after = [dataclasses.replace(p, params={k: p.params[k] + u.params[k]
                                                    for k in p.params})
                     for p, u in zip(_mine(self, params), ups)]
            stats, drop, _ = self.allocate(after, grads, state.stats, state.count)
            new_e = iter([jnp.where(d, -p.params["e"], u.params["e"])
                          for d, p, u in zip(drop, _mine(self, params), ups)])

            def fix(u):
                if not (is_adapter(u) and u.method == self):
                    return u
                return dataclasses.replace(u, params={**u.params, "e": next(new_e)})

            updates = jax.tree.map(fix, updates, is_leaf=is_adapter)
            return updates, AllocatorState(inner, state.count + 1, stats)

        return optax.GradientTransformation(init_fn, update_fn)

    def callback(self, run: Run):
        """None (allocation lives in the optimizer); warns when the run's length is not the
        ``total_step`` the budget schedule was built for."""
        if run.steps != self.total_step:
            run.log(f"warning: {self.name} total_step={self.total_step} but the run trains "
                    f"{run.steps} steps; its budget schedule ends at total_step")
        return None
