"""The jitted steps: one reusable train step over a user's loss, the objectives, evaluation.

``make_train_step(loss_fn, tx, shardings)`` is the one train step of lora_jax: the trainer, every
``experiments/bench*.py`` and user code build theirs with it. It knows no method and no model:
``loss_fn(trainable, frozen, batch, rng) -> scalar`` is the caller's (methods' loss terms are added
inside it with ``lj.regularizer``), gradients are taken with respect to ``trainable`` only, and
``trainable`` and the optimizer state are donated. With ``guard_nonfinite=True`` a step whose loss,
gradient norm or update is not finite leaves the state unchanged (``metrics['finite']`` says so);
``first_nonfinite_leaf`` then names the culprit, outside the step, only when that flag trips.

An ``Objective`` is what a data kind (``lora_jax.data.kinds``) is trained and scored on: the batch
keys the model takes, the training loss and the per-example eval scores. ``objective_for(kind)``
is the one map from ``DataConfig.kind`` to it: the token loss with exact match for language
modelling, cross-entropy on ``labels`` with argmax accuracy for classification.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

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


def token_scores(logits, batch):
    """Per example: (loss sum (B,), scored tokens (B,), exact match (B,) bool); logits (B, T, V)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])
    mask = batch["loss_mask"]
    correct = jnp.all((jnp.argmax(logits, -1) == batch["targets"]) | (mask <= 0), axis=-1)
    return jnp.sum(ce * mask, -1), jnp.sum(mask, -1), correct


def _class_logits(logits):
    if not hasattr(logits, "ndim") or logits.ndim != 2:
        got = type(logits).__name__ if not hasattr(logits, "shape") else logits.shape
        raise ValueError(f"a classification data kind needs a model that returns logits "
                         f"(batch, classes); got {got}: give the model a classifier head (e.g. "
                         "--config.model.overrides=head=sequence,n_labels=2 for BERT)")
    return logits.astype(jnp.float32)


def class_loss(logits, batch):
    """Mean cross-entropy of logits (B, classes) against ``batch['labels']`` int (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(_class_logits(logits),
                                                           batch["labels"]).mean()


def class_scores(logits, batch):
    """Per example: (cross-entropy (B,), ones (B,), argmax == label (B,) bool)."""
    logits = _class_logits(logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return ce, jnp.ones_like(ce), jnp.argmax(logits, -1) == batch["labels"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run learns from its batches.

    ``inputs``: batch keys passed to the model, positionally, in order; ``loss(logits, batch) ->
    scalar`` (training); ``scores(logits, batch) -> (loss sum (B,), weight (B,), correct (B,))``
    (evaluation: loss = Σ loss sum / Σ weight, accuracy = mean of correct); ``weight(batch) ->
    scalar``: how many terms ``loss`` averages over (gradient accumulation weighs microbatches
    by it; None: the batch's rows).
    """

    inputs: tuple[str, ...]
    loss: Callable
    scores: Callable
    weight: Callable | None = None

    def model_inputs(self, batch) -> tuple:
        """The model's positional inputs from a batch dict."""
        return tuple(batch[k] for k in self.inputs)


_OBJECTIVES = {"lm": (lambda logits, batch: token_loss(logits, batch)[0], token_scores,
                      lambda batch: jnp.sum(batch["loss_mask"])),
               "classify": (class_loss, class_scores, None)}


def objective_for(kind: str) -> Objective:
    """The ``Objective`` of ``DataConfig.kind`` (``lora_jax.data.kinds``): its inputs and loss."""
    k = D.get_kind(kind)
    return Objective(k.inputs, *_OBJECTIVES[k.objective])


LM = objective_for("tasks")


def _rows(batch):
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])


def accumulated(loss_fn: Callable, microbatches: int, weight: Callable | None = None,
                batch_sharding=None) -> Callable:
    """``value_and_grad(loss_fn)`` over a batch taken in ``microbatches`` slices, one at a time.

    The loss and gradients are the slices' means weighted by ``weight(slice)`` (default: its
    rows), Σ wᵢ·lossᵢ / Σ wᵢ: exactly the whole batch's when ``loss_fn`` is a mean over the terms
    ``weight`` counts (the token loss, Σ ce·mask / Σ mask, with ``weight`` = Σ mask), and a
    batch-independent term (a regulariser) passes through unchanged. Slice i holds rows i, i+k,
    i+2k, ... (k = microbatches), so under a sharded batch every device keeps its own rows;
    ``rng`` is folded with i (dropout masks differ from the one-batch step's). Memory: one slice's
    activations plus one float32 gradient accumulator.
    """
    grad_fn = jax.value_and_grad(loss_fn)
    if microbatches == 1:
        return grad_fn
    weight = weight or _rows

    def fn(trainable, frozen, batch, rng):
        def split(x):  # (B, ...) -> (k, B/k, ...): slice i = rows i, i+k, ...
            return jnp.swapaxes(x.reshape(-1, microbatches, *x.shape[1:]), 0, 1)

        def body(carry, xs):
            i, micro = xs
            if batch_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, batch_sharding)
            r = None if rng is None else jax.random.fold_in(rng, i)
            loss, grads = grad_fn(trainable, frozen, micro, r)
            w = jnp.asarray(weight(micro), jnp.float32)
            total, wsum, acc = carry
            acc = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), acc, grads)
            return (total + w * loss, wsum + w, acc), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        init = (jnp.float32(0), jnp.float32(0), zeros)
        xs = (jnp.arange(microbatches), jax.tree.map(split, batch))
        (total, wsum, acc), _ = jax.lax.scan(body, init, xs)
        wsum = jnp.where(wsum > 0, wsum, 1.0)
        grads = jax.tree.map(lambda a, x: (a / wsum).astype(x.dtype), acc, trainable)
        return total / wsum, grads

    return fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    shardings: sharding.TrainShardings | None = None, *,
                    guard_nonfinite: bool = False, microbatches: int = 1,
                    weight: Callable | None = None) -> Callable:
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
      microbatches: gradient accumulation: the batch (B rows, B divisible by it) is taken in
        this many slices, one at a time; ``weight(batch) -> scalar`` weighs them (the number of
        terms ``loss_fn`` averages over; default the rows). See ``accumulated``.
    Returns:
      The jitted step; ``metrics`` is ``{'loss', 'grad_norm', 'finite'}`` (replicated scalars;
      ``finite`` is a bool). Trainable arrays and optimizer state are donated.
    """

    grad_fn = accumulated(loss_fn, microbatches, weight,
                          None if shardings is None else shardings.batch)

    def step(trainable, opt_state, frozen, batch, rng):
        loss, grads = grad_fn(trainable, frozen, batch, rng)
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


def make_eval_step(forward: Callable, shardings: sharding.TrainShardings | None = None,
                   objective: Objective = LM):
    """``eval_step(trainable, frozen, local_batch) -> objective.scores`` of the batch's rows.

    ``forward(trainable, frozen, inputs, task_ids, rng, train) -> logits``, ``inputs`` the tuple
    ``objective.model_inputs(batch)``. With ``shardings`` the batch is this process's slice of a
    global batch (``D.EvalLoader.batch``; ``sharding.shard_batch`` joins the slices) and the
    scores come back sharded like it: each process reads only its own rows' scores, (B / P,)
    numpy arrays in the order of its slice. Without: one device, the batch as given.
    """

    def eval_step(trainable, frozen, batch):
        logits = forward(trainable, frozen, objective.model_inputs(batch), batch["task_ids"],
                         None, False)
        return objective.scores(logits, batch)

    if shardings is None:
        return jax.jit(eval_step)
    sh = shardings
    eval_jit = jax.jit(eval_step, in_shardings=(sh.trainable, sh.frozen, sh.batch),
                       out_shardings=sh.batch)
    local = lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
        x, sh.mesh, sh.batch.spec))  # this process's rows, in the order it gave them
    return lambda t, f, batch: tuple(
        local(x) for x in eval_jit(t, f, sharding.shard_batch(batch, sh.mesh)))


def evaluate(eval_step, trainable, frozen, evals: D.EvalLoader, tasks) -> dict[str, Any]:
    """Eval loss and accuracy (per task and 'mean') over every row of ``evals``.

    Each process scores its share (``D.EvalLoader``: its slice of each global batch, padding
    cut); the real rows' scores are gathered in row order and reduced as one process does: loss
    = Σ loss sums / Σ weights, summed per global batch of B rows (float32) and then added, and
    per-task accuracy over all rows. One process's numbers are exactly those it gave before eval
    was split; P processes' equal them to float rounding (only the devices' reduction order
    differs).
    """
    parts = []
    for k in range(evals.num_batches):
        keep = evals.keep(k)
        parts.append([np.asarray(x)[:keep] for x in eval_step(trainable, frozen, evals.batch(k))])
    s, c, ok = (np.concatenate(p) for p in zip(*parts))
    s, c, ok = evals.gather(s), evals.gather(c), evals.gather(ok.astype(np.int32))
    task_ids = evals.gather(evals.rows["task_ids"][:evals.num_local])
    b = evals.global_batch_size
    loss_sum = sum(float(s[i:i + b].sum()) for i in range(0, len(s), b))
    count = sum(float(c[i:i + b].sum()) for i in range(0, len(c), b))
    return {"loss": loss_sum / max(count, 1.0),
            "accuracy": D.per_task_accuracy(ok, task_ids, list(tasks))}
