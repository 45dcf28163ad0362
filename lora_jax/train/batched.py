"""Batched sweeps: several LoRA experiments on one frozen base, trained as one jitted step.

Points that share the base, the model, the data, the mesh and the loop (``group_key``) and differ
only in adapter rank, alpha, rsLoRA, dropout, seed, LoRA init ('default'/'gaussian'), LoRA+ ratio
and the optimizer (learning rate, schedule, warm-up, weight decay, clipping) train together
(``train_group``):

- each point keeps its own ``ArrayLoader`` (its own seed), exactly as its solo run draws batches;
  the K batches are stacked (K, B, seq) and the step's forward pass is the solo one ``jax.vmap``-ed
  over the points: the frozen base is shared (not mapped), point i's rows are routed to slot i of
  a bank (``lj.stack_adapters``, methods/bank.py) and its dropout key is its solo run's, so its
  adapter-dropout masks (``PointBank``: each slot its own rate) and model-dropout masks (a rate
  the group shares) are the solo run's too;
- the bank is built INSIDE the loss from the points' own unpadded trainable trees, so a smaller
  rank is zero-padded on the fly: the padding is no parameter, gets no gradient and no optimizer
  state, and each point's tree, optimizer and state have exactly its solo run's structure;
- the loss is the sum of the points' own mean token losses, so each point's gradient is its solo
  gradient; each point's own optimizer (``trainer.adapter_setup``'s: clipping, schedule, LoRA+)
  updates its own tree inside the same jitted step (K small elementwise updates, one program);
- on ``cfg.mesh`` every point's trees are placed as its solo run's (``trainer.shard_setup``), the
  bank is sharded like single adapters (``group_shardings``) and each point's B rows are split over
  the data axes, as in its solo step (the stacked batch's K axis is not sharded);
- a point whose step is non-finite keeps its last state, is stopped alone (no summary; its
  ``diverged.json`` says why) and the others continue.

Each point's workdir gets what its solo run writes (``run.json``, ``base_eval.json``,
``metrics.jsonl``, ``tb/``, ``adapter/``, ``summary.json``), evaluated as the solo eval does.
Checkpoints are each point's own, in its solo run's format: a group interrupted by SIGTERM
resumes exactly (all points from the same step), and a point's checkpoint also resumes solo.
Not here: multi-process runs (a group runs in one process, on all its local devices), PiSSA,
modules_to_save, other methods (``solo_reason`` says why such a point runs solo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import data as D
from lora_jax import sharding
from lora_jax.methods import Ctx, is_adapter
from lora_jax.methods.bank import Bank
from lora_jax.train import checkpoint, trainer
from lora_jax.train import workdir as wd
from lora_jax.train.config import Experiment, to_dict
from lora_jax.train.metrics import MetricsWriter, Progress
from lora_jax.train.steps import objective_for, token_loss, token_scores

# What may differ between the points of one group (the rest of the config must be equal).
PER_POINT = ("seed", "adapter.rank", "adapter.alpha", "adapter.rslora", "adapter.dropout",
             "optim.*", "method_args.init_weights", "method_args.lora_plus_ratio")
BATCHABLE_INITS = ("default", "gaussian")
LM_KINDS = ("tasks", "jsonl", "text")  # data kinds whose objective is the token loss


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def solo_reason(cfg: Experiment) -> str | None:
    """Why ``cfg`` cannot train in a batched group (None: it can)."""
    if cfg.full_finetune or not trainer.build_method(cfg).stackable:
        return (f"method {cfg.method!r}: its adapters do not stack into a bank (full fine-tuning "
                "and such methods train solo)")
    if cfg.data.kind not in LM_KINDS:
        return (f"data.kind={cfg.data.kind!r}: a batched group trains the token loss of "
                f"{LM_KINDS} only")
    init = cfg.method_args.get("init_weights", "default")
    if init not in BATCHABLE_INITS:
        return f"init_weights={init!r} changes the base per point (PiSSA's residual)"
    extra = sorted(set(cfg.method_args) - {"init_weights", "lora_plus_ratio"})
    if extra:
        return f"method_args {extra} are not batched"
    if cfg.adapter.modules_to_save:
        return "modules_to_save changes the base per point"
    if cfg.train.skip_nonfinite:
        return "train.skip_nonfinite: a batched group stops a diverged point instead"
    return None


def group_key(cfg: Experiment) -> str:
    """What must be equal for points to share a group: the config without the ``PER_POINT``
    fields (base, model, data, targets, quantisation, method, loop lengths, mesh)."""
    flat = _flat(to_dict(cfg))
    keep = {k: v for k, v in flat.items()
            if not any(k == p or (p.endswith(".*") and k.startswith(p[:-1])) for p in PER_POINT)}
    return repr(sorted(keep.items()))


def plan_groups(cfgs: Sequence[Experiment]) -> tuple[list[list[int]], dict[int, str]]:
    """``(groups, solo)``: lists of point indices that train together (2 or more each, in
    order), and ``{index: why it trains solo}`` for the rest."""
    solo, by_key = {}, {}
    for i, cfg in enumerate(cfgs):
        reason = solo_reason(cfg)
        if reason:
            solo[i] = reason
        else:
            by_key.setdefault(group_key(cfg), []).append(i)
    groups = []
    for members in by_key.values():
        if len(members) > 1:
            groups.append(members)
        else:
            solo[members[0]] = ("no other point shares its base, model, data, targets, mesh and "
                                "loop (only rank, alpha, rsLoRA, dropout, seed, init, LoRA+ and "
                                "optim may differ)")
    return groups, dict(sorted(solo.items()))


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class PointBank(Bank):
    """The bank of a batched group, with each point's own adapter dropout: slot i drops its
    input with keep probability ``keep[i]`` (1 - its ``adapter.dropout``), using the key and mask
    shape its solo run draws (``module.make_rng('dropout')`` of its own rng, inside the vmapped
    forward), so the masks are the solo run's."""

    name: ClassVar[str] = "point_bank"
    keep: tuple[float, ...] = ()

    def output(self, y, x, adapter, kernel, bias, module, ctx: Ctx):
        # as ctx.dropout_active and transform._dropout for one LoRA, the rate per slot
        if ctx.train and adapter.layout.kind != "embed" and min(self.keep, default=1.0) < 1.0:
            keep = jnp.asarray(self.keep, jnp.float32)[ctx.adapter_ids]
            mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
            x = jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)
        return super().output(y, x, adapter, kernel, bias, module, ctx)


def make_bank(trainables, states, keep: Sequence[float], shardings=None):
    """The points' adapters as one bank (slot i = point i), padded to the largest rank inside the
    traced function (the padding is no parameter and gets no gradient), each point's scale folded
    into its B, and, with ``shardings`` (``GroupShardings.bank``), sharded like single adapters."""
    bank = lj.stack_adapters({str(i): lj.join(t, s)
                              for i, (t, s) in enumerate(zip(trainables, states))})
    method = PointBank(keep=tuple(float(k) for k in keep))
    bank = jax.tree.map(lambda a: dataclasses.replace(a, method=method), bank, is_leaf=is_adapter)
    if shardings is None:
        return bank
    leaves, tree = jax.tree.flatten(bank)  # (``shardings`` was made for other dropout rates)
    return jax.tree.unflatten(tree, [jax.lax.with_sharding_constraint(x, s) for x, s in
                                     zip(leaves, jax.tree.leaves(shardings))])


def _forward(model, mesh, train: bool) -> Callable:
    """``(bank, params, inputs, slot, task_ids, rng) -> logits`` of one point (``inputs``: the
    model's positional inputs, a tuple): its solo
    forward pass, every row routed to bank slot ``slot``; batch-sharded on a mesh as the solo
    step is (``sharding.batch_sharded``)."""

    def one(bank, params, inputs, slot, task_ids, rng):
        return lj.apply(model, params, bank, *inputs, train=train, adapter_ids=slot,
                        task_ids=task_ids, rngs=None if rng is None else {"dropout": rng},
                        deterministic=not train)

    return one if mesh is None else sharding.batch_sharded(one, mesh)


@dataclasses.dataclass(frozen=True)
class GroupShardings:
    """A group's shardings on ``cfg.mesh``: each point's own (``trainer.shard_setup``: its
    trainable tree and optimizer state placed as its solo run's), the bank's, and the batches'
    (train batches (K, B, ...) with B over the data axes; eval batches (E, ...) as solo)."""

    points: tuple[sharding.TrainShardings, ...]
    bank: Any

    @property
    def mesh(self):
        return self.points[0].mesh

    @property
    def batch(self):
        return NamedSharding(self.mesh, P(None, sharding.DATA_AXES))


def group_shardings(cfgs, model, example, setups) -> GroupShardings:
    """Each point's shardings as its solo run's, and the bank's from the bank method's
    ``leaf_axes``: a single adapter's axes with an unsharded slot axis after the stacked axes."""
    points = tuple(trainer.shard_setup(c, model, example, s) for c, s in zip(cfgs, setups))
    shapes = jax.eval_shape(lambda t, s: make_bank(t, s, [1.0] * len(t)),
                            tuple(s.trainable for s in setups),
                            tuple(s.frozen["state"] for s in setups))
    specs = sharding.logical_specs(shapes, sharding.param_logical_specs(model, example))
    return GroupShardings(points, sharding.shardings(specs, points[0].mesh,
                                                     sharding.logical_rules(cfgs[0].mesh), shapes))


def make_group_step(model, cfgs: Sequence[Experiment], setups: Sequence[trainer.Setup],
                    sh: GroupShardings | None = None) -> Callable:
    """``step(trainables, opt_states, params, states, batch, step) -> (trainables, opt_states,
    out)`` for K points.

    ``trainables``/``opt_states``/``states``: K-tuples of the points' own trees; ``batch``: the
    points' batches stacked, (K, B, seq); ``step``: the 1-based step (int32), from which each
    point's dropout key is its solo run's, ``fold_in(key(seed + 2), step)``. The forward pass is
    the solo one ``jax.vmap``-ed over the points (the frozen base shared, not mapped), point i's
    rows routed to bank slot i. ``out``: ``{'loss', 'grad_norm', 'finite'}``, each (K,). A
    non-finite point keeps its state.
    """
    k = len(setups)
    inputs = objective_for(cfgs[0].data.kind).model_inputs  # e.g. packed rows' segment_ids
    keep = [1.0 - c.adapter.dropout for c in cfgs]
    seeds = [c.seed for c in cfgs]
    forward = jax.vmap(_forward(model, sh and sh.mesh, True), in_axes=(None, None, 0, 0, 0, 0))

    def losses_fn(trainables, params, states, batch, keys):
        bank = make_bank(trainables, states, keep, sh and sh.bank)
        logits = forward(bank, params, inputs(batch), jnp.arange(k), batch["task_ids"], keys)
        losses = jax.vmap(lambda lg, t, m: token_loss(lg, {"targets": t, "loss_mask": m})[0])(
            logits, batch["targets"], batch["loss_mask"])
        return jnp.sum(losses), losses

    def step(trainables, opt_states, params, states, batch, step_no):
        keys = jnp.stack([jax.random.fold_in(jax.random.key(s + 2), step_no) for s in seeds])
        grad_fn = jax.value_and_grad(losses_fn, has_aux=True)
        (_, losses), grads = grad_fn(trainables, params, states, batch, keys)
        new_t, new_o, norms, finite = [], [], [], []
        for i, s in enumerate(setups):  # each point's own optimizer: schedule, clip, LoRA+
            updates, opt = s.tx.update(grads[i], opt_states[i], trainables[i])
            norm = optax.global_norm(grads[i])
            ok = (jnp.isfinite(losses[i]) & jnp.isfinite(norm)
                  & jnp.isfinite(optax.global_norm(updates)))
            keep_ok = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            new_t.append(keep_ok(optax.apply_updates(trainables[i], updates), trainables[i]))
            new_o.append(keep_ok(opt, opt_states[i]))
            norms.append(norm)
            finite.append(ok)
        out = {"loss": losses, "grad_norm": jnp.stack(norms), "finite": jnp.stack(finite)}
        return tuple(new_t), tuple(new_o), out

    if sh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    t = tuple(p.trainable for p in sh.points)
    o = tuple(p.opt_state for p in sh.points)
    rep = sh.points[0].replicated
    return jax.jit(step, donate_argnums=(0, 1),
                   in_shardings=(t, o, sh.points[0].frozen["params"],
                                 tuple(p.frozen["state"] for p in sh.points), sh.batch, rep),
                   out_shardings=(t, o, rep))


def make_group_eval(model, k: int, kind: str, sh: GroupShardings | None = None) -> Callable:
    """``eval(trainables, params, states, batch) -> token_scores`` of every point, each (K, E),
    on one eval batch (E, seq) that all points read (``steps.token_scores``: loss sums, scored
    tokens, exact match per example)."""
    forward = jax.vmap(_forward(model, sh and sh.mesh, False),
                       in_axes=(None, None, None, 0, None, None))
    inputs = objective_for(kind).model_inputs

    def ev(trainables, params, states, batch):
        bank = make_bank(trainables, states, [1.0] * k, sh and sh.bank)
        logits = forward(bank, params, inputs(batch), jnp.arange(k), batch["task_ids"], None)
        return jax.vmap(token_scores, in_axes=(0, None))(logits, batch)

    if sh is None:
        return jax.jit(ev)
    p0 = sh.points[0]
    ev_jit = jax.jit(ev, in_shardings=(tuple(p.trainable for p in sh.points),
                                       p0.frozen["params"],
                                       tuple(p.frozen["state"] for p in sh.points), p0.batch),
                     out_shardings=p0.replicated)
    return lambda t, p, s, batch: ev_jit(t, p, s, sharding.replicate_batch(batch, sh.mesh))


def evaluate_group(ev, trainables, params, states, arrays, batch_size: int, tasks) -> list[dict]:
    """Each point's eval loss and accuracy on ``arrays``, computed as ``steps.evaluate`` does for
    its solo run (same batches, the last one padded by wrapping around and cut)."""
    k, n = len(trainables), len(arrays["task_ids"])
    loss_sum, count, correct = [0.0] * k, [0.0] * k, [[] for _ in range(k)]
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        keep = min(batch_size, n - start)
        s, c, ok = (np.asarray(x)[:, :keep] for x in
                    ev(trainables, params, states, {key: v[idx] for key, v in arrays.items()}))
        for i in range(k):
            loss_sum[i], count[i] = loss_sum[i] + float(s[i].sum()), count[i] + float(c[i].sum())
            correct[i].append(ok[i])
    return [{"loss": loss_sum[i] / max(count[i], 1.0),
             "accuracy": D.per_task_accuracy(np.concatenate(correct[i]), arrays["task_ids"],
                                             list(tasks))} for i in range(k)]


# ----------------------------------------------------------------------------- the job


@dataclasses.dataclass
class _Point:
    """One point's own things: config, workdir, setup, loader, writer, eval and progress."""

    cfg: Experiment
    workdir: Path
    setup: trainer.Setup
    loader: D.ArrayLoader
    metrics: MetricsWriter
    ckpts: checkpoint.Checkpoints
    progress: Progress | None = None
    base_eval: dict | None = None
    loss: float | None = None
    stopped: str | None = None
    saved: int = 0


def _check_group(cfgs: Sequence[Experiment]) -> None:
    for i, cfg in enumerate(cfgs):
        reason = solo_reason(cfg)
        if reason:
            raise ValueError(f"point {i} cannot be batched: {reason}; train it solo")
    keys = [group_key(c) for c in cfgs]
    for i, key in enumerate(keys[1:], 1):
        if key != keys[0]:
            a, b = dict(eval(keys[0])), dict(eval(key))  # noqa: S307 -- our own repr
            diff = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            raise ValueError(f"points 0 and {i} differ in {diff}, which a group must share; "
                             "split them with plan_groups")


def _point(cfg, workdir, model, params, example, train_arrays) -> _Point:
    workdir = Path(workdir)
    first = checkpoint.check_identity(workdir, trainer.run_identity(cfg),
                                      recorded=trainer.launch_record(cfg))
    for line in wd.check_data_unchanged(first.get("data", {}),
                                        allow_change=cfg.train.allow_data_change):
        trainer.log(line)
    setup = trainer.adapter_setup(cfg, model, params, example)
    loader = D.ArrayLoader(train_arrays, cfg.train.batch_size, seed=cfg.seed)
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", cfg.train.keep_checkpoints,
                                   info={"method": cfg.method, "ranks": cfg.adapter.rank},
                                   log=trainer.log)  # the solo run's format: either resumes it
    return _Point(cfg, workdir, setup, loader, MetricsWriter(workdir), ckpts)


def train_group(cfgs: Sequence[Experiment], workdirs: Sequence[str | Path],
                log: Callable[[str], None] = trainer.log) -> list[dict]:
    """Trains ``cfgs`` (one group: see ``plan_groups``) together; returns each point's summary
    (``{'diverged': True, ...}`` for a point stopped alone). Complete workdirs are not retrained.

    Every point's workdir is written as its solo ``train_and_evaluate`` would write it, checkpoints
    included; after SIGTERM each point's entry is ``{'interrupted': True, 'step': N}`` and a rerun
    resumes the group. The group runs on ``cfg.mesh`` (shared by its points) in one process.
    """
    trainer.PREEMPTION.install()
    _check_group(cfgs)
    for cfg in cfgs:
        trainer.validate(cfg)
    if jax.process_count() > 1:
        raise ValueError(f"a batched group runs in one process (any number of local devices), "
                         f"not {jax.process_count()}; train multi-process points solo")
    with contextlib.ExitStack() as locks:
        for w in workdirs:  # the solo run's lock: a second job on a point fails (WorkdirBusy)
            locks.enter_context(wd.WorkdirLock(Path(w)))
        return _run_group(cfgs, workdirs, log)


def _run_group(cfgs, workdirs, log) -> list[dict]:
    todo = [i for i, w in enumerate(workdirs) if not (Path(w) / "summary.json").exists()]
    summaries = [wd.read_json(Path(w) / "summary.json", "delete it") if i not in todo else None
                 for i, w in enumerate(workdirs)]
    if not todo:
        return summaries
    cfg0 = cfgs[todo[0]]
    kind = D.get_kind(cfg0.data.kind)
    tokenizer = kind.tokenizer(cfg0.data)
    model, _, hf_params = trainer.build_model(cfg0.model, D.vocab_size(tokenizer))
    train_arrays, eval_arrays, tasks = trainer.load_data(cfg0.data, tokenizer)
    example = jnp.asarray(kind.example(cfg0.data))
    params = trainer.base_params(cfg0, model, hf_params, example)
    params = trainer.quantize_base(cfg0, model, params, example)
    pts = [_point(cfgs[i], workdirs[i], model, params, example, train_arrays) for i in todo]
    sh = group_shardings([p.cfg for p in pts], model, example, [p.setup for p in pts])
    params = sharding.put(params, sh.points[0].frozen["params"], may_alias=True)
    ev = make_group_eval(model, len(pts), cfg0.data.kind, sh)
    run_evals = lambda t, s: evaluate_group(ev, t, params, s, eval_arrays,
                                            cfg0.train.eval_batch_size, tasks)
    step_fn = make_group_step(model, [p.cfg for p in pts], [p.setup for p in pts], sh)
    try:
        out = _loop(pts, sh, params, step_fn, run_evals, log)
    finally:
        for p in pts:
            p.metrics.close()
            p.ckpts.close()
    for i, s in zip(todo, out):
        summaries[i] = s
    return summaries


def _loop(pts: list[_Point], sh: GroupShardings, params, step_fn, run_evals, log) -> list[dict]:
    """Base eval, the shared loop (one step for every point), each point's final eval/export."""
    k, steps, bs = len(pts), pts[0].cfg.train.steps, pts[0].cfg.train.batch_size
    trainables = tuple(sharding.put(p.setup.trainable, s.trainable)
                       for p, s in zip(pts, sh.points))
    states = tuple(sharding.put(p.setup.frozen["state"], s.frozen["state"])
                   for p, s in zip(pts, sh.points))
    opt_states = tuple(jax.jit(p.setup.tx.init, out_shardings=s.opt_state)(t)
                       for p, s, t in zip(pts, sh.points, trainables))
    start, trainables, opt_states = _restore(pts, trainables, opt_states)
    if start == 0:
        for p, ev in zip(pts, run_evals(trainables, states)):
            p.base_eval = ev
            (p.workdir / "metrics.jsonl").unlink(missing_ok=True)  # a start before any checkpoint
            p.metrics.write_config(to_dict(p.cfg))
            p.metrics.write(0, "eval", **ev)
            wd.write_json(p.workdir / "base_eval.json", ev)
    else:
        log(f"batched group: resuming from step {start}")
    done = [trainer.read_progress(p.workdir, start) if start else {} for p in pts]
    for p, d in zip(pts, done):
        p.base_eval = p.base_eval or wd.read_json(p.workdir / "base_eval.json", "delete it")
        p.loss, p.saved = d.get("train_loss"), start
        p.progress = Progress(steps, p.cfg.train.batch_size, start, p.cfg.data.seq_len)
    train_time, t_cfg = (done[0].get("train_seconds", 0.0) if start else 0.0), pts[0].cfg.train

    def save(step):
        for i, p in enumerate(pts):
            if step > p.saved and p.stopped is None:
                p.ckpts.save(step, (trainables[i], opt_states[i]))
                trainer.write_progress(p.workdir, step, p.cfg.train.keep_checkpoints,
                                        train_seconds=train_time, train_loss=p.loss,
                                        skipped_steps=0)
                p.saved = step

    log(f"batched group of {k} points: ranks {[p.cfg.adapter.rank for p in pts]}, "
        f"{k} x {bs} rows per step on mesh {dict(sh.mesh.shape)}")
    step = start
    for step in range(start + 1, steps + 1):
        if trainer.PREEMPTION.should_stop(step):
            save(step - 1)
            trainer.PREEMPTION.requested = False
            log(f"SIGTERM: checkpointed step {step - 1} of every point; rerun to resume")
            return [{"interrupted": True, "step": step - 1} for _ in pts]
        t0 = time.perf_counter()
        parts = [p.loader.batch(step - 1) for p in pts]
        batch = jax.device_put({key: np.stack([b[key] for b in parts]) for key in parts[0]},
                               sh.batch)
        trainables, opt_states, out = step_fn(trainables, opt_states, params, states, batch,
                                              np.int32(step))
        finite = np.asarray(out["finite"])
        train_time += time.perf_counter() - t0
        for i, p in enumerate(pts):
            if p.stopped is None and not finite[i]:
                p.stopped = (f"step {step}: non-finite training (loss {float(out['loss'][i])}, "
                             f"gradient norm {float(out['grad_norm'][i])}); stopped alone, the "
                             "group continued; lower optim.lr and rerun it")
                log(f"{p.workdir.name}: {p.stopped}")
                wd.write_json(p.workdir / "diverged.json", {"step": step, "reason": p.stopped})
            if step == start + 1:
                p.progress.mark(step)
        if step % t_cfg.log_every == 0 or step == steps:
            losses, norms = np.asarray(out["loss"]), np.asarray(out["grad_norm"])
            for i, p in enumerate(pts):
                if p.stopped is not None:
                    continue
                p.loss = float(losses[i])
                rates = p.progress.report(step)
                p.metrics.write(step, "train", loss=float(losses[i]), grad_norm=float(norms[i]),
                                lr=float(p.setup.lr(step - 1)), skipped_steps=0, **rates)
            log(f"step {step}/{steps}  losses " + " ".join(f"{l:.4f}" for l in losses))
        if step % t_cfg.eval_every == 0 and step != steps:
            for p, ev in zip(pts, run_evals(trainables, states)):
                if p.stopped is None:
                    p.metrics.write(step, "eval", **ev)
        if step % t_cfg.checkpoint_every == 0:
            save(step)
    save(step)
    finals = run_evals(trainables, states)
    return [_finish(p, trainables[i], states[i], finals[i], step, train_time)
            for i, p in enumerate(pts)]


def _restore(pts, trainables, opt_states):
    """``(start, trainables, opt_states)`` from the points' newest checkpoints (all at one step)."""
    got = [p.ckpts.restore_latest((t, o)) for p, t, o in zip(pts, trainables, opt_states)]
    starts = sorted({s for s, _ in got})
    if len(starts) > 1:
        at = {p.workdir.name: s for p, (s, _) in zip(pts, got)}
        raise ValueError(f"a batched group resumes together, but its points' newest checkpoints "
                         f"are at different steps {at}; resume them solo (python -m "
                         "experiments.train) or delete their checkpoints/")
    return starts[0], tuple(t for _, (t, _) in got), tuple(o for _, (_, o) in got)


def _frozen(p: _Point, state) -> dict:
    return {"params": p.setup.frozen["params"], "state": state}


def _finish(p: _Point, trainable, state, final: dict, step: int, train_time: float) -> dict:
    """The solo run's final eval, export and ``summary.json`` for one point."""
    if p.stopped is not None:
        return {"diverged": True, "reason": p.stopped}
    cfg, frozen = p.cfg, _frozen(p, state)
    p.metrics.write(step, "eval", **final)
    p.setup.export(*sharding.gather_for_export(trainable, frozen), p.workdir)
    summary = trainer.summary_record(cfg, trainable, frozen, step, train_time, p.loss, final,
                                     p.base_eval, skipped=0)
    summary["batched"] = True  # train_seconds is the whole group's
    wd.write_json(p.workdir / "summary.json", summary)
    return summary
