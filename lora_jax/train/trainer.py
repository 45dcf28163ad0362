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
from lora_jax import distributed, io, methods, models, sharding
from lora_jax.train import checkpoint
from lora_jax.train.config import (FULL, BaseConfig, DataConfig, Experiment, ModelConfig,
                                   OptimConfig, TrainConfig, fingerprint, to_dict)
from lora_jax.train.metrics import MetricsWriter, Progress, format_duration
from lora_jax.train.steps import evaluate, make_eval_step, make_train_step, token_loss


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

    Built only from what defines the base (model, ``cfg.base`` with its own seed, tokenizer,
    sequence length, data seed), so runs that differ in anything else (the adapters' ``seed``
    included) share one cached base.
    """
    b, d = cfg.base, cfg.data
    return Experiment(
        method=FULL, seed=b.seed, model=cfg.model, mesh=cfg.mesh,
        base=BaseConfig(source="init", pretrain_tasks=b.pretrain_tasks,
                        pretrain_steps=b.pretrain_steps, pretrain_lr=b.pretrain_lr,
                        pretrain_batch_size=b.pretrain_batch_size, seed=b.seed),
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
            jax.random.key(cfg.base.seed))
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


def quantize_base(cfg: Experiment, model, params, example):
    """The frozen base with the ``cfg.quant`` targets quantised (QLoRA), or unchanged.

    Adapters are then initialised over the quantised weights (as in QLoRA), so an identity init
    reproduces the quantised base exactly. Quantisation is a property of the frozen base, so it
    composes with any adapter method (QLoRA, QDoRA, ...), not with full fine-tuning.
    """
    q = cfg.quant
    if not q.kind:
        return params
    if cfg.full_finetune:
        raise ValueError(f"quant.kind={q.kind!r} quantises the frozen base, but method='full' "
                         "trains every parameter; use an adapter method or quant.kind=''")
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


# ----------------------------------------------------------------------------- what trains


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
    """The base optimizer with its schedule (no clipping: ``clipped`` adds it around the whole
    trainable tree, so LoRA+'s groups are clipped together)."""
    if oc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, oc.lr, min(oc.warmup_steps, total_steps),
                                                max(total_steps, oc.warmup_steps + 1))
    elif oc.schedule == "constant":
        lr = optax.linear_schedule(0.0, oc.lr, max(oc.warmup_steps, 1))
    else:
        raise ValueError(f"unknown optim.schedule {oc.schedule!r}; use 'cosine' or 'constant'")
    if oc.name == "adamw":
        return optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay)
    if oc.name == "sgd":
        return optax.sgd(lr, momentum=oc.b1)
    raise ValueError(f"unknown optim.name {oc.name!r}; use 'adamw' or 'sgd'")


def clipped(oc, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` after one global-norm clip over every trainable leaf (``optim.grad_clip``)."""
    return optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx) if oc.grad_clip else tx


@dataclasses.dataclass
class Setup:
    """What trains and how: the trees, the forward pass and loss over them, the optimizer, the
    export, and the methods' training callbacks."""

    trainable: Any
    frozen: Any
    forward: Callable  # (trainable, frozen, inputs, task_ids, rng, train) -> logits
    penalty: Callable  # (trainable, frozen) -> scalar added to the loss (methods' regularisers)
    tx: optax.GradientTransformation
    export: Callable  # (trainable, frozen, workdir) -> None
    methods: tuple = ()  # the adapter methods (empty for full fine-tuning)


def build_method(cfg: Experiment) -> lj.Method:
    """The method object of ``cfg`` (validated by the method itself)."""
    return methods.from_config(cfg.method, cfg.method_args)


def adapter_spec(cfg: Experiment) -> lj.LoraSpec:
    a = cfg.adapter
    split = lambda s: tuple(filter(None, (p.strip() for p in s.split(","))))
    return lj.LoraSpec(rank=a.rank, alpha=a.alpha, targets=split(a.targets),
                       exclude=split(a.exclude), dropout=a.dropout, method=build_method(cfg),
                       rslora=a.rslora, modules_to_save=split(a.modules_to_save))


def _rngs(rng):
    return None if rng is None else {"dropout": rng}


def full_setup(cfg: Experiment, model, params) -> Setup:
    """Full fine-tuning, the baseline: every parameter trains as itself; no adapters."""

    def forward(trainable, frozen, inputs, task_ids, rng, train):
        return model.apply({"params": trainable}, inputs, deterministic=not train,
                           rngs=_rngs(rng))

    tx = clipped(cfg.optim, make_optimizer(cfg.optim, cfg.train.steps))
    return Setup(params, {}, forward, lambda t, f: 0.0, tx,
                 lambda t, f, w: io.save_params(w / "params.msgpack", t))


def adapter_setup(cfg: Experiment, model, params, example) -> Setup:
    """Adapters of ``cfg.method`` on the frozen base: init, the method's base transform (PiSSA's
    residual), the split into trainable arrays and frozen state, the method's optimizer."""
    spec = adapter_spec(cfg)
    layouts = lj.trace_layouts(model, params, example)
    adapters = lj.init_adapters(params, spec, jax.random.key(cfg.seed + 1), layouts=layouts)
    params, adapters = lj.transform_base(params, adapters)
    trainable, state = lj.split(adapters)
    tx = clipped(cfg.optim, lj.adapter_optimizer(make_optimizer(cfg.optim, cfg.train.steps),
                                                 trainable))
    log(lj.summary(params, adapters))

    def forward(trainable, frozen, inputs, task_ids, rng, train):
        return lj.apply(model, frozen["params"], lj.join(trainable, frozen["state"]), inputs,
                        train=train, task_ids=task_ids, rngs=_rngs(rng),
                        deterministic=not train)

    def export(trainable, frozen, workdir):
        meta = {"spec": to_dict(cfg.adapter), "method": cfg.method,
                "method_args": dict(cfg.method_args), "model": to_dict(cfg.model)}
        io.save_adapters(workdir / "adapter", lj.join(trainable, frozen["state"]), meta)

    penalty = lambda t, f: lj.regularizer(lj.join(t, f["state"]))
    return Setup(trainable, {"params": params, "state": state}, forward, penalty, tx, export,
                 tuple(methods.methods_of(adapters)))


def make_setup(cfg: Experiment, model, params, example) -> Setup:
    if cfg.full_finetune:
        return full_setup(cfg, model, params)
    return adapter_setup(cfg, model, params, example)


def make_steps(setup: Setup, sh: sharding.TrainShardings | None = None):
    """The jitted train and eval steps of a ``Setup`` (token loss plus the methods' penalty)."""
    forward = setup.forward if sh is None else sharding.batch_sharded(setup.forward, sh.mesh)

    def loss_fn(trainable, frozen, batch, rng):
        logits = forward(trainable, frozen, batch["inputs"], batch["task_ids"], rng, True)
        return token_loss(logits, batch)[0] + setup.penalty(trainable, frozen)

    return make_train_step(loss_fn, setup.tx, sh), make_eval_step(forward, sh)


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


# ----------------------------------------------------------------------------- the loop


class Preemption:
    """SIGTERM as a flag the trainer checks at safe points (setup done, every step).

    ``PREEMPTION.install()`` is called as early as possible (the launcher calls it before its
    heavy imports through ``request()`` of a signal it caught itself), so a SIGTERM at any moment
    of a run (start-up and pretraining included) ends it with a checkpoint and exit 0, never
    with -15. Only the main thread can install it; elsewhere the flag is never set.
    """

    def __init__(self):
        self.requested = False

    def request(self, *_):
        self.requested = True

    def install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self.request)
        except ValueError:  # not the main thread
            pass


PREEMPTION = Preemption()


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


def _interrupted(workdir, step: int, what: str) -> dict:
    PREEMPTION.requested = False  # handled: a later run in this process starts afresh
    log(f"SIGTERM {what}; rerun the same command to resume from step {step} in {workdir}")
    return {"interrupted": True, "step": step}


def train_and_evaluate(cfg: Experiment, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the summary it writes.

    Writes ``run.json`` (identity), ``checkpoints/``, ``metrics.jsonl``, ``tb/``, the export
    (``adapter/`` or ``params.msgpack``) and ``summary.json``. If SIGTERM arrives, the current
    state is checkpointed and the function returns ``{'interrupted': True}`` without a summary.
    A completed run is never rewritten: rerunning it returns its summary.
    """
    PREEMPTION.install()
    if not cfg.full_finetune:
        build_method(cfg)  # the method validates its arguments before the workdir is touched
    distributed.initialize(cfg.mesh)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.check_identity(workdir, _identity(cfg))
    if (workdir / "summary.json").exists():
        summary = json.loads((workdir / "summary.json").read_text())
        log(f"{workdir} is complete (summary.json); nothing to do")
        return summary
    tokenizer = D.get_tokenizer(cfg.data.tokenizer)
    model, model_cfg, hf_params = build_model(cfg.model, tokenizer.vocab_size)
    train_arrays, eval_arrays, tasks = load_data(cfg.data, tokenizer)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = base_params(cfg, model, hf_params, example)
    if params is None or PREEMPTION.requested:
        return _interrupted(workdir, 0, "during start-up")
    params = quantize_base(cfg, model, params, example)
    setup = make_setup(cfg, model, params, example)
    sh = shard_setup(cfg, model, example, setup)
    train_step, eval_step = make_steps(setup, sh)
    loader = D.ArrayLoader(train_arrays, cfg.train.batch_size, seed=cfg.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())

    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", cfg.train.keep_checkpoints)
    trainable, frozen = sharding.put((setup.trainable, setup.frozen), (sh.trainable, sh.frozen))
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(trainable)
    start, (trainable, opt_state) = ckpts.restore_latest((trainable, opt_state))
    run_eval = lambda t, f: evaluate(eval_step, t, f, eval_arrays, cfg.train.eval_batch_size,
                                     tasks)
    run = methods.Run(model=model, train_arrays=train_arrays, tasks=tuple(tasks),
                      steps=cfg.train.steps, seed=cfg.seed, workdir=workdir, evaluate=run_eval,
                      log=log)
    callbacks = [c for c in (m.callback(run) for m in setup.methods) if c is not None]
    for c in callbacks:  # e.g. LoSA: masks change between segments
        frozen = c.restore(start, frozen)
    base_file = workdir / "base_eval.json"
    if base_file.exists():
        base_eval = json.loads(base_file.read_text())
    else:
        base_eval = run_eval(trainable, frozen)
        if jax.process_index() == 0:
            base_file.write_text(json.dumps(base_eval))
    if start:
        log(f"resuming from step {start}")
    metrics = MetricsWriter(workdir) if jax.process_index() == 0 else distributed.NullWriter()
    progress = Progress(cfg.train.steps, cfg.train.batch_size * cfg.data.seq_len, start)
    key = jax.random.key(cfg.seed + 2)
    train_time, loss, step = 0.0, float("nan"), start
    for step in range(start + 1, cfg.train.steps + 1):
        if PREEMPTION.requested:
            ckpts.save(step - 1, (trainable, opt_state))
            ckpts.close()
            metrics.close()
            return _interrupted(workdir, step - 1, f"checkpointed step {step - 1}")
        for c in callbacks:
            frozen = c(step, trainable, frozen)
        t0 = time.perf_counter()
        batch = sharding.shard_batch(loader.batch(step - 1), sh.mesh)
        trainable, opt_state, out = train_step(trainable, opt_state, frozen, batch,
                                               jax.random.fold_in(key, step))
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            loss = float(out["loss"])
            rates = progress.report(step)
            metrics.write(step, "train", loss=loss, grad_norm=float(out["grad_norm"]), **rates)
            log(f"step {step}/{cfg.train.steps}  loss {loss:.4f}  "
                f"{rates['steps_per_sec']:.1f} steps/s  {rates['tokens_per_sec']:,.0f} tok/s  "
                f"ETA {format_duration(rates['eta_sec'])}")
        train_time += time.perf_counter() - t0
        if step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            ev = run_eval(trainable, frozen)
            metrics.write(step, "eval", **ev)
            log(f"eval @ {step}: loss {ev['loss']:.4f}  accuracy {ev['accuracy']['mean']:.3f}")
        if step % cfg.train.checkpoint_every == 0:
            ckpts.save(step, (trainable, opt_state))
    ckpts.save(step, (trainable, opt_state))
    ckpts.close()
    final = run_eval(trainable, frozen)
    metrics.write(step, "eval", **final)
    metrics.close()
    exported = distributed.gather((trainable, frozen))  # every process takes part
    if jax.process_index() == 0:
        setup.export(*exported, workdir)
    n_train = lj.count_params(trainable)
    n_base = lj.count_params(frozen.get("params", {}))
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
    for c in callbacks:
        summary.update(c.finish(*exported, workdir))
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(_accuracy_table(base_eval["accuracy"], final["accuracy"]))
    log(f"eval loss {base_eval['loss']:.4f} -> {final['loss']:.4f} | trainable params "
        f"{n_train:,} of {n_base + n_train:,} | train time {format_duration(train_time)}")
    return summary
