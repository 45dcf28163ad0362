"""``train_and_evaluate(config, workdir)``: one experiment, top to bottom.

1. model, tokenizer and data; 2. base parameters (pretrained once and cached, loaded from a Hugging
Face checkpoint, or freshly initialised); 3. adapters (or the whole model for full fine-tuning),
with a report of what trains; 4. a jitted step (gradients w.r.t. the trainable tree only); 5. the
loop: step → metrics → eval → checkpoint, resumable from the workdir after any interruption
(SIGTERM checkpoints and returns); 6. export and ``summary.json``. Flags live in
``experiments/train.py``; configs in ``configs/``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax import data as D
from lora_jax import distributed, io, models, sharding
from lora_jax.sparsity import schedule as losa_schedule
from lora_jax.train import checkpoint
from lora_jax.train.config import (BaseConfig, DataConfig, Experiment, ModelConfig, OptimConfig,
                                   TrainConfig, fingerprint, to_dict)
from lora_jax.train.metrics import MetricsWriter, Progress, format_duration


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- model and data


def _overrides(text: str) -> dict[str, Any]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def build_model(mc: ModelConfig, vocab_size: int):
    """``(module, model_config, params_or_None)``; params only for a Hugging Face checkpoint."""
    dtypes = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
    if mc.hf_path:
        module, params = models.load_hf_checkpoint(mc.hf_path, scan_layers=mc.scan_layers, **dtypes)
        return module, module.config, params
    module, cfg = models.get_model(mc.family, mc.preset, scan_layers=mc.scan_layers,
                                   remat=mc.remat, **dtypes, **_overrides(mc.overrides))
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer's {vocab_size}; set "
                         "--config.model.overrides=vocab_size=N")
    return module, cfg, None


def load_data(dc, tokenizer, process_index: int = 0, process_count: int = 1):
    """``(train_arrays, eval_arrays, task_names)`` for the data config."""
    if dc.kind == "tasks":
        make = lambda split, n: D.make_task_dataset(dc.tasks, split, n, dc.seed, dc.seq_len,
                                                    tokenizer)
        return make("train", dc.n_train_per_task), make("eval", dc.n_eval_per_task), dc.tasks
    if dc.kind == "jsonl":
        load = lambda p: D.load_jsonl(p, tokenizer, dc.seq_len)
    elif dc.kind == "text":
        load = lambda p: D.load_text([p], tokenizer, dc.seq_len)
    else:
        raise ValueError(f"unknown data.kind {dc.kind!r}; use 'tasks', 'jsonl' or 'text'")
    if not dc.train_path or not dc.eval_path:
        raise ValueError(f"data.kind={dc.kind!r} needs data.train_path and data.eval_path")
    train = D.shard_rows(load(dc.train_path), process_index, process_count)
    return train, load(dc.eval_path), ("all",)


# ----------------------------------------------------------------------------- base parameters


def _cache_dir(cfg: Experiment) -> Path:
    root = cfg.base.cache_dir or os.environ.get("LORA_JAX_CACHE") or "~/.cache/lora_jax"
    return Path(root).expanduser()


def pretrain_experiment(cfg: Experiment) -> Experiment:
    """The full fine-tuning run that makes the cached base model for ``cfg``.

    Built only from what defines the base (model, ``cfg.base``, tokenizer, sequence length,
    seeds), so runs that differ in anything else share one cached base.
    """
    b, d = cfg.base, cfg.data
    return Experiment(
        method="full", seed=cfg.seed, model=cfg.model, mesh=cfg.mesh,
        base=BaseConfig(source="init", pretrain_tasks=b.pretrain_tasks,
                        pretrain_steps=b.pretrain_steps, pretrain_lr=b.pretrain_lr,
                        pretrain_batch_size=b.pretrain_batch_size),
        data=DataConfig(kind="tasks", tasks=b.pretrain_tasks, seq_len=d.seq_len,
                        tokenizer=d.tokenizer, seed=d.seed),
        optim=OptimConfig(lr=b.pretrain_lr),
        train=TrainConfig(steps=b.pretrain_steps, batch_size=b.pretrain_batch_size,
                          eval_every=b.pretrain_steps, checkpoint_every=500),
    )


def base_params(cfg: Experiment, model, hf_params, example):
    """The frozen base: HF checkpoint, fresh init, or the cached pretrained model.

    None if SIGTERM interrupted the pretraining (it resumes on the next run).
    """
    if cfg.base.source == "hf":
        if hf_params is None:
            raise ValueError("base.source='hf' needs model.hf_path")
        return hf_params
    if cfg.base.source == "init":
        return jax.jit(lambda k: lj.transform._unbox(model.init(k, example)["params"]))(
            jax.random.key(cfg.seed))
    if cfg.base.source != "pretrain":
        raise ValueError(f"unknown base.source {cfg.base.source!r}; use 'pretrain', 'init', 'hf'")
    pre = pretrain_experiment(cfg)
    key = fingerprint(pre.model, pre.data, pre.base, pre.optim, pre.train, pre.seed)  # not mesh
    workdir = _cache_dir(cfg) / f"base-{cfg.model.family}-{cfg.model.preset}-{key}"
    path = workdir / "params.msgpack"
    if path.exists():
        log(f"base model: cached at {workdir}")
    else:
        log(f"base model: pretraining on {', '.join(pre.data.tasks)} "
            f"({pre.train.steps} steps; cached at {workdir})")
        if train_and_evaluate(pre, workdir).get("interrupted"):
            return None
    return io.load_params(path)


def prepare_base(cfg: Experiment, model, params, example):
    """Method preparation of the frozen base: quantise the ``cfg.quant`` targets (QLoRA).

    Adapters are then initialised over the quantised weights (as in QLoRA), so B = 0 reproduces
    the quantised base exactly.
    """
    q = cfg.quant
    if not q.kind:
        return params
    if cfg.method == "full":
        raise ValueError(f"quant.kind={q.kind!r} quantises the frozen base, but method='full' "
                         "trains every parameter; use an adapter method or quant.kind=''")
    if cfg.adapter.init == "pissa":
        raise ValueError("adapter.init='pissa' turns the base into a residual, which would need "
                         "re-quantising (QPiSSA/LoftQ, not supported); use quant.kind='' or "
                         "adapter.init='default'")
    split = lambda s: tuple(filter(None, (p.strip() for p in s.split(","))))
    layouts = lj.trace_layouts(model, params, example)
    qparams = lj.quantize_params(params, split(q.targets), q.kind, layouts=layouts,
                                 exclude=split(q.exclude), block_size=q.block_size,
                                 double_quant=q.double_quant)
    flat, qflat = lj.rules.flatten(params), lj.rules.flatten(qparams)
    done = [p for p in flat if qflat[p] is not flat[p]]
    mib = lambda tree: lj.quant.nbytes(tree) / 2**20
    log(f"quantised {len(done)} kernels to {q.kind} (targets {q.targets!r}): those kernels "
        f"{mib([flat[p] for p in done]):.2f} -> {mib([qflat[p] for p in done]):.2f} MiB; "
        f"base {mib(params):.2f} -> {mib(qparams):.2f} MiB")
    return qparams


# ----------------------------------------------------------------------------- steps


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
    if oc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, oc.lr, min(oc.warmup_steps, total_steps),
                                                max(total_steps, oc.warmup_steps + 1))
    elif oc.schedule == "constant":
        lr = optax.linear_schedule(0.0, oc.lr, max(oc.warmup_steps, 1))
    else:
        raise ValueError(f"unknown optim.schedule {oc.schedule!r}; use 'cosine' or 'constant'")
    if oc.name == "adamw":
        tx = optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay)
    elif oc.name == "sgd":
        tx = optax.sgd(lr, momentum=oc.b1)
    else:
        raise ValueError(f"unknown optim.name {oc.name!r}; use 'adamw' or 'sgd'")
    return optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx) if oc.grad_clip else tx


@dataclasses.dataclass
class Setup:
    """What a method contributes to the loop: the trees and the forward pass over them."""

    trainable: Any
    frozen: Any
    forward: Callable  # (trainable, frozen, inputs, task_ids, rng, train) -> logits
    tx: optax.GradientTransformation
    export: Callable  # (trainable, frozen, workdir) -> None


def adapter_spec(cfg: Experiment) -> lj.LoraSpec:
    a = cfg.adapter
    split = lambda s: tuple(filter(None, (p.strip() for p in s.split(","))))
    return lj.LoraSpec(rank=a.rank, alpha=a.alpha, targets=split(a.targets),
                       exclude=split(a.exclude), dropout=a.dropout, method=cfg.method,
                       init=a.init, rslora=a.rslora, modules_to_save=split(a.modules_to_save),
                       options=method_options(cfg))


def method_options(cfg: Experiment) -> tuple:
    """``LoraSpec.options`` for the multi-task methods, from ``cfg.mtl``; T = len(data.tasks)."""
    m, num_tasks = cfg.mtl, len(cfg.data.tasks) if cfg.data.kind == "tasks" else 1
    return {"mtl": (("num_tasks", num_tasks), ("num_up", m.num_up),
                    ("temperature", m.temperature), ("diagonal", m.diagonal)),
            "per_task": (("num_tasks", num_tasks),),
            "multilora": (("num_loras", m.num_loras),)}.get(cfg.method, ())


def _rngs(rng):
    return None if rng is None else {"dropout": rng}


def setup_method(cfg: Experiment, model, params, example) -> Setup:
    """Builds the trainable/frozen split for ``cfg.method``."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    if cfg.method == "full":
        def forward(trainable, frozen, inputs, task_ids, rng, train):
            return model.apply({"params": trainable}, inputs, deterministic=not train,
                               rngs=_rngs(rng))

        return Setup(params, {}, forward, tx,
                     lambda t, f, w: io.save_params(w / "params.msgpack", t))
    spec = adapter_spec(cfg)
    layouts = lj.trace_layouts(model, params, example)
    adapters = lj.init_adapters(params, spec, jax.random.key(cfg.seed + 1), layouts=layouts)
    if spec.init == "pissa":
        params = lj.unmerge(params, adapters)
    trainable, state = lj.split(adapters)
    ratio = cfg.adapter.lora_plus_ratio or None
    tx = lj.adapter_optimizer(tx, trainable, lora_plus_ratio=ratio)
    log(lj.summary(params, adapters))

    def forward(trainable, frozen, inputs, task_ids, rng, train):
        return lj.apply(model, frozen["params"], lj.join(trainable, frozen["state"]), inputs,
                        train=train, task_ids=task_ids, rngs=_rngs(rng),
                        deterministic=not train)

    def export(trainable, frozen, workdir):
        meta = {"spec": to_dict(cfg.adapter), "method": cfg.method, "model": to_dict(cfg.model),
                "options": [list(o) for o in method_options(cfg)]}
        adapters = lj.join(trainable, frozen["state"])
        io.save_adapters(workdir / "adapter", adapters, meta)
        if cfg.mtl.export_merged and cfg.method in ("mtl", "per_task"):
            for t, name in enumerate(cfg.data.tasks):  # one merged model per task
                io.save_params(workdir / "merged" / f"{name}.msgpack",
                               lj.merge(frozen["params"], adapters, task=t))

    return Setup(trainable, {"params": params, "state": state}, forward, tx, export)


def token_loss(logits, batch):
    """Mean cross-entropy over the loss-mask positions; also returns the mask's sum."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(mask)


def make_steps(setup: Setup, sh: sharding.TrainShardings | None = None):
    """The jitted train and eval steps. Trainable params and optimizer state are donated.

    With shardings ``sh`` (``lora_jax.sharding.train_shardings``) both steps are jitted with
    explicit in/out shardings (the train step's outputs are sharded exactly as its inputs), the
    train step takes a global batch (``sharding.shard_batch``) and the eval step host arrays.
    """

    forward = setup.forward if sh is None else sharding.batch_sharded(setup.forward, sh.mesh)

    def loss_fn(trainable, frozen, batch, rng):
        logits = forward(trainable, frozen, batch["inputs"], batch["task_ids"], rng, True)
        return token_loss(logits, batch)[0]

    def train_step(trainable, opt_state, frozen, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, opt_state = setup.tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def eval_step(trainable, frozen, batch):
        logits = forward(trainable, frozen, batch["inputs"], batch["task_ids"], None, False)
        loss, n = token_loss(logits, batch)
        return loss * n, n, jnp.argmax(logits, -1)

    if sh is None:
        return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step)
    train_step = jax.jit(
        train_step, donate_argnums=(0, 1),
        in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
        out_shardings=(sh.trainable, sh.opt_state, sh.replicated))
    eval_jit = jax.jit(eval_step, in_shardings=(sh.trainable, sh.frozen, sh.batch),
                       out_shardings=sh.replicated)
    return train_step, lambda t, f, batch: eval_jit(t, f, sharding.replicate_batch(batch, sh.mesh))


def shard_setup(cfg: Experiment, model, example, setup: Setup) -> sharding.TrainShardings:
    """The mesh of ``cfg.mesh`` and the shardings of the step's arguments (lora_jax.sharding)."""
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, mesh)
    sharding.check_batch(cfg.train.eval_batch_size, mesh, "train.eval_batch_size")
    specs = sharding.param_logical_specs(model, example)
    log(f"mesh {dict(mesh.shape)} (preset {cfg.mesh.preset!r}) over {jax.process_count()} "
        f"process(es)")
    return sharding.train_shardings(mesh, sharding.logical_rules(cfg.mesh), specs,
                                    setup.trainable, setup.frozen, setup.tx)


def evaluate(eval_step, trainable, frozen, arrays, batch_size: int, tasks) -> dict:
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


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM into a flag the loop checks (only in the main thread)."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _identity(cfg: Experiment) -> dict:
    d = to_dict(cfg)
    for k in ("eval_every", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        d["train"].pop(k)
    d.pop("mesh")  # a run may resume on another topology (process count, mesh shape)
    return d


def _accuracy_table(base: dict, final: dict) -> str:
    names = [k for k in final if k != "mean"] + ["mean"]
    width = max(len(n) for n in names)
    lines = [f"{'task'.ljust(width)}  base    adapted"]
    lines += [f"{n.ljust(width)}  {base.get(n, float('nan')):.3f}   {final[n]:.3f}" for n in names]
    return "\n".join(lines)


def train_and_evaluate(cfg: Experiment, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the summary it writes.

    Writes ``run.json`` (identity), ``checkpoints/``, ``metrics.jsonl``, ``tb/``, the export
    (``adapter/`` or ``params.msgpack``) and ``summary.json``. If SIGTERM arrives, the current
    state is checkpointed and the function returns ``{'interrupted': True}`` without a summary.
    """
    distributed.initialize(cfg.mesh)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.check_identity(workdir, _identity(cfg))
    tokenizer = D.get_tokenizer(cfg.data.tokenizer)
    model, model_cfg, hf_params = build_model(cfg.model, tokenizer.vocab_size)
    train_arrays, eval_arrays, tasks = load_data(cfg.data, tokenizer)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = base_params(cfg, model, hf_params, example)
    if params is None:
        return {"interrupted": True, "step": 0}
    params = prepare_base(cfg, model, params, example)
    setup = setup_method(cfg, model, params, example)
    sh = shard_setup(cfg, model, example, setup)
    train_step, eval_step = make_steps(setup, sh)
    loader = D.ArrayLoader(train_arrays, cfg.train.batch_size, seed=cfg.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())

    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", cfg.train.keep_checkpoints)
    trainable, frozen = sharding.put((setup.trainable, setup.frozen), (sh.trainable, sh.frozen))
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(trainable)
    start, (trainable, opt_state) = ckpts.restore_latest((trainable, opt_state))
    hook = losa_schedule.trainer_hook(
        cfg, model, frozen, train_arrays, workdir,
        lambda t, f: evaluate(eval_step, t, f, eval_arrays, cfg.train.eval_batch_size, tasks), log)
    frozen = hook.restore(start, frozen) if hook else frozen  # LoSA: masks change between segments
    base_file = workdir / "base_eval.json"
    if base_file.exists():
        base_eval = json.loads(base_file.read_text())
    else:
        base_eval = evaluate(eval_step, trainable, frozen, eval_arrays,
                             cfg.train.eval_batch_size, tasks)
        if jax.process_index() == 0:
            base_file.write_text(json.dumps(base_eval))
    if start:
        log(f"resuming from step {start}")
    metrics = MetricsWriter(workdir) if jax.process_index() == 0 else distributed.NullWriter()
    progress = Progress(cfg.train.steps, cfg.train.batch_size * cfg.data.seq_len, start)
    key = jax.random.key(cfg.seed + 2)
    train_time, loss, step = 0.0, float("nan"), start
    with _Preemption() as preempt:
        for step in range(start + 1, cfg.train.steps + 1):
            if hook:
                frozen = hook(step, trainable, frozen)
            t0 = time.perf_counter()
            batch = sharding.shard_batch(loader.batch(step - 1), sh.mesh)
            trainable, opt_state, loss = train_step(trainable, opt_state, frozen, batch,
                                                    jax.random.fold_in(key, step))
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                loss = float(loss)
                rates = progress.report(step)
                metrics.write(step, "train", loss=loss, **rates)
                log(f"step {step}/{cfg.train.steps}  loss {loss:.4f}  "
                    f"{rates['steps_per_sec']:.1f} steps/s  {rates['tokens_per_sec']:,.0f} tok/s  "
                    f"ETA {format_duration(rates['eta_sec'])}")
            train_time += time.perf_counter() - t0
            if step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                ev = evaluate(eval_step, trainable, frozen, eval_arrays,
                              cfg.train.eval_batch_size, tasks)
                metrics.write(step, "eval", **ev)
                log(f"eval @ {step}: loss {ev['loss']:.4f}  accuracy {ev['accuracy']['mean']:.3f}")
            if step % cfg.train.checkpoint_every == 0 or preempt.requested:
                ckpts.save(step, (trainable, opt_state))
            if preempt.requested:
                log(f"SIGTERM: checkpointed step {step} in {workdir}; rerun to resume")
                ckpts.close()
                metrics.close()
                return {"interrupted": True, "step": step}
    ckpts.save(step, (trainable, opt_state))
    ckpts.close()
    final = evaluate(eval_step, trainable, frozen, eval_arrays, cfg.train.eval_batch_size, tasks)
    metrics.write(step, "eval", **final)
    metrics.close()
    exported = distributed.gather((trainable, frozen))  # every process takes part
    if jax.process_index() == 0:
        setup.export(*exported, workdir)
    n_train = lj.count_params(trainable)
    n_base = lj.count_params(frozen.get("params", {})) if cfg.method != "full" else 0
    summary = {
        "method": cfg.method,
        "model": f"{cfg.model.family}/{cfg.model.preset}" if not cfg.model.hf_path
        else cfg.model.hf_path,
        "trainable_params": n_train,
        "total_params": n_base + n_train,
        "steps": step,
        "train_seconds": train_time,
        "final_train_loss": float(loss),
        "final_eval_loss": final["loss"],
        "base_eval_loss": base_eval["loss"],
        "base_accuracy": base_eval["accuracy"],
        "accuracy": final["accuracy"],
        "tokens_per_sec": cfg.train.batch_size * cfg.data.seq_len * (step - start)
        / max(train_time, 1e-9),
    }
    if hook:
        summary.update(hook.finish(trainable, frozen, workdir))
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(_accuracy_table(base_eval["accuracy"], final["accuracy"]))
    log(f"eval loss {base_eval['loss']:.4f} -> {final['loss']:.4f} | trainable params "
        f"{n_train:,} of {n_base + n_train:,} | train time {format_duration(train_time)}")
    return summary
