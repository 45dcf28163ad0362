"""The jitted steps: one reusable train step over a user's loss, the token loss, evaluation.

``make_train_step(loss_fn, tx, shardings)`` is the one train step of lora_jax: the trainer, every
``experiments/bench*.py`` and user code build theirs with it. It knows no method and no model:
``loss_fn(trainable, frozen, batch, rng) -> scalar`` is the caller's (methods' loss terms are added
inside it with ``lj.regularizer``), gradients are taken with respect to ``trainable`` only, and
``trainable`` and the optimizer state are donated. With ``guard_nonfinite=True`` a step whose loss,
gradient norm or update is not finite leaves the state unchanged (``metrics['finite']`` says so);
``first_nonfinite_leaf`` then names the culprit, outside the step, only when that flag trips.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import data as D
from lora_jax import sharding


def token_loss(logits, batch):
    """Mean cross-entropy over the loss-mask positions; also returns the mask's sum.

    logits: (batch, seq, vocab); batch['targets'] (batch, seq) int; batch['loss_mask'] (batch,
    seq) float.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(mask)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    shardings: sharding.TrainShardings | None = None, *,
                    guard_nonfinite: bool = False) -> Callable:
    """``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``.

    Args:
      loss_fn: ``(trainable, frozen, batch, rng) -> scalar``; differentiated in ``trainable``.
      tx: the optimizer (e.g. ``lj.adapter_optimizer(...)`` chained after clipping).
      shardings: from ``lora_jax.sharding.train_shardings``: the step is then jitted with explicit
        in/out shardings (outputs sharded exactly as inputs) and takes a global batch
        (``sharding.shard_batch``). None: plain ``jax.jit``.
      guard_nonfinite: if True, a step whose loss, gradient norm or update norm is NaN/inf
        returns ``trainable`` and ``opt_state`` unchanged (as ``optax.apply_if_finite`` does, but
        without changing the optimizer state's structure, so checkpoints stay compatible).
    Returns:
      The jitted step; ``metrics`` is ``{'loss', 'grad_norm', 'finite'}`` (replicated scalars;
      ``finite`` is a bool). Trainable arrays and optimizer state are donated.
    """

    def step(trainable, opt_state, frozen, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        grad_norm = optax.global_norm(grads)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.global_norm(updates)))
        new_trainable = optax.apply_updates(trainable, updates)
        if guard_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_trainable, new_opt_state = (keep(new_trainable, trainable),
                                            keep(new_opt_state, opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        return new_trainable, new_opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    sh = shardings
    return jax.jit(step, donate_argnums=(0, 1),
                   in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
                   out_shardings=(sh.trainable, sh.opt_state, sh.replicated))


def _first_bad(tree) -> str | None:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if not bool(jnp.all(jnp.isfinite(x))):
            return jax.tree_util.keystr(path)
    return None


def first_nonfinite_leaf(loss_fn: Callable, tx: optax.GradientTransformation, trainable,
                         opt_state, frozen, batch, rng) -> str:
    """Names what made a step non-finite, recomputing it (slowly, once) from the state before it.

    Returns e.g. ``"gradient ['blocks_0']['attn']['q'].a"``, ``"update ['head'].b"`` (finite
    gradients, but the optimizer made a NaN/inf step: e.g. a NaN learning rate), ``"loss"`` (the
    loss alone), or ``"parameter ..."`` when the state itself already holds NaN/inf.
    """
    bad = _first_bad(trainable)
    if bad:
        return f"parameter {bad}"
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable, frozen, batch, rng)
    bad = _first_bad(grads)
    if bad:
        return f"gradient {bad}"
    updates, _ = jax.jit(tx.update)(grads, opt_state, trainable)
    bad = _first_bad(updates)
    if bad:
        return f"update {bad}"
    return "loss" if not bool(jnp.isfinite(loss)) else "none found (not reproducible)"


def make_eval_step(forward: Callable, shardings: sharding.TrainShardings | None = None):
    """``eval_step(trainable, frozen, host_batch) -> (loss_sum, count, argmax predictions)``.

    ``forward(trainable, frozen, inputs, task_ids, rng, train) -> logits``.
    """

    def eval_step(trainable, frozen, batch):
        logits = forward(trainable, frozen, batch["inputs"], batch["task_ids"], None, False)
        loss, n = token_loss(logits, batch)
        return loss * n, n, jnp.argmax(logits, -1)

    if shardings is None:
        return jax.jit(eval_step)
    sh = shardings
    eval_jit = jax.jit(eval_step, in_shardings=(sh.trainable, sh.frozen, sh.batch),
                       out_shardings=sh.replicated)
    return lambda t, f, batch: eval_jit(t, f, sharding.replicate_batch(batch, sh.mesh))


def evaluate(eval_step, trainable, frozen, arrays, batch_size: int, tasks) -> dict[str, Any]:
    """Eval loss and exact-match accuracy (per task and 'mean') on ``arrays``."""
    n = len(arrays["inputs"])
    loss_sum, count, preds = 0.0, 0.0, []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # pad the last batch by wrapping around
        batch = {k: v[idx] for k, v in arrays.items()}
        keep = min(batch_size, n - start)
        batch["loss_mask"][keep:] = 0.0
        s, c, p = eval_step(trainable, frozen, batch)
        loss_sum, count = loss_sum + float(s), count + float(c)
        preds.append(np.asarray(p)[:keep])
    correct = D.exact_match(np.concatenate(preds), arrays["targets"], arrays["loss_mask"])
    acc = D.per_task_accuracy(correct, arrays["task_ids"], list(tasks))
    return {"loss": loss_sum / max(count, 1.0), "accuracy": acc}
