"""``train_and_evaluate(config, workdir)``: one experiment, top to bottom.

1. model, tokenizer and data (of ``data.kind``: ``lora_jax.data.kinds``; its loss and scores:
``steps.objective_for``); 2. base parameters (pretrained once and cached, loaded from a Hugging
Face checkpoint, or freshly initialised), created in their shards on the mesh; 3. adapters (or
the whole model for full fine-tuning), with a report of what trains; 4. a jitted step (gradients w.r.t. the trainable tree only); 5. the
loop: step → metrics → eval → checkpoint, resumable from the workdir after any interruption
(SIGTERM checkpoints and returns); 6. export and ``summary.json``. Flags live in
``experiments/train.py``; configs in ``configs/``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
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
from lora_jax.models import hf_sharded
from jax.experimental import multihost_utils

from lora_jax.train import checkpoint
from lora_jax.train import workdir as wd
from lora_jax.train.config import (FULL, BaseConfig, DataConfig, Experiment, ModelConfig,
                                   OptimConfig, TrainConfig, fingerprint, to_dict)
from lora_jax.train.metrics import MetricsWriter, Progress, format_duration
from lora_jax.train.steps import (LM, Objective, evaluate, first_nonfinite_leaf, make_eval_step,
                                  make_train_step, objective_for)


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


def build_model(mc: ModelConfig, vocab_size: int | None, *, weights: bool = True):
    """``(module, model_config, params_or_None)``; params only for a Hugging Face checkpoint.

    ``vocab_size``: the tokenizer's, or None for data without tokens (images). ``weights=False``:
    a GPT-2, Llama or BERT checkpoint's module is built from its config.json alone and its params
    are None (``base_params`` then reads them straight into their shards).
    """
    dtypes = dict(dtype=jnp.dtype(mc.dtype), param_dtype=jnp.dtype(mc.param_dtype))
    if mc.hf_path:
        args = dict(scan_layers=mc.scan_layers, remat=mc.remat, **dtypes)
        if not weights and _hf_family(mc.hf_path) in hf_sharded.SHARDED_FAMILIES:
            module, params = hf_sharded.hf_module(mc.hf_path, _overrides(mc.overrides),
                                                  **args), None
        else:
            module, params = models.load_hf_checkpoint(mc.hf_path, **args,
                                                       overrides=_overrides(mc.overrides))
        if hasattr(module.cfg, "remat_policy"):
            module = module.clone(cfg=dataclasses.replace(module.cfg,
                                                          remat_policy=mc.remat_policy))
        _check_vocab(module.cfg, vocab_size, mc)
        return module, module.cfg, params
    module, cfg = models.get_model(mc.family, mc.preset, **_family_args(mc), **dtypes,
                                   **_overrides(mc.overrides))
    _check_vocab(cfg, vocab_size, mc)
    return module, cfg, None


def _hf_family(path: str) -> str | None:
    return io.read_json(Path(path) / "config.json", "model.hf_path must be a Hugging Face "
                        "model directory").get("model_type")


def _family_args(mc: ModelConfig) -> dict:
    """``scan_layers``, ``remat``, ``remat_policy``: those the family's config has (BERT and ViT
    have no ``remat_policy``); a field it lacks must keep ModelConfig's default."""
    _, default = models.get_model(mc.family, mc.preset)
    args = dict(scan_layers=mc.scan_layers, remat=mc.remat, remat_policy=mc.remat_policy)
    for k, v in args.items():
        if not hasattr(default, k) and v != getattr(ModelConfig, k):
            raise ValueError(f"model.{k}={v!r}: the {mc.family!r} family has no {k}; leave it "
                             "at its default")
    return {k: v for k, v in args.items() if hasattr(default, k)}


def _check_vocab(model_cfg, vocab_size: int | None, mc: ModelConfig) -> None:
    if (vocab_size is None) != (getattr(model_cfg, "vocab_size", None) is None):
        model_reads, data_gives = ("tokens", "no tokens") if vocab_size is None else \
            ("no tokens", "tokens")
        raise ValueError(f"model {mc.family!r} reads {model_reads} but data.kind gives "
                         f"{data_gives}; pair a token model with a token data.kind and an image "
                         "model with data.kind='images'")
    if vocab_size is None:
        return
    if model_cfg.vocab_size < vocab_size:
        fix = ("use a tokenizer of at most that size (--config.data.tokenizer=PATH/tokenizer.json)"
               if mc.hf_path else "set --config.model.overrides=vocab_size=N")
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} < the tokenizer's "
                         f"{vocab_size}; {fix}")


def check_model(mc: ModelConfig, vocab_size: int | None) -> None:
    """Validates ``mc`` cheaply (no weights read): family, preset, overrides, HF config.json."""
    if mc.hf_path:
        path = Path(mc.hf_path) / "config.json"
        hf = io.read_json(path, "model.hf_path must be a Hugging Face model directory") \
            if path.is_file() else None
        if hf is None:
            raise ValueError(f"model.hf_path={mc.hf_path!r} has no config.json; pass a Hugging "
                             "Face model directory (config.json + model.safetensors)")
        _check_vocab(models.hf.config_from_hf(hf), vocab_size, mc)
        return
    _family_args(mc)
    _, cfg = models.get_model(mc.family, mc.preset, **_overrides(mc.overrides))
    _check_vocab(cfg, vocab_size, mc)


def data_files(dc: DataConfig) -> list[str]:
    """The local files the data config reads (their digests are recorded in ``run.json``)."""
    return D.get_kind(dc.kind).files(dc)


def check_data(dc: DataConfig) -> None:
    """Validates the data config without loading it: kind, task names, files."""
    D.get_kind(dc.kind).check(dc)


def load_data(dc, tokenizer, process_index: int = 0, process_count: int = 1):
    """``(train_rows, eval_rows, task_names)`` for the data config (``tokenizer`` from
    ``D.get_kind(dc.kind).tokenizer(dc)``). Rows are built only when taken (``D.Rows``): with
    ``process_index``/``process_count`` (the ``ArrayLoader``'s and ``EvalLoader``'s) a process
    tokenises only its train batches' rows and its eval share; the rows are the same for any
    process count (a lookup ``rows['inputs']`` builds them all)."""
    return D.get_kind(dc.kind).load(dc, tokenizer, process_index, process_count, _allgather)


def _allgather(x: np.ndarray) -> np.ndarray:
    """The concatenation, in process order, of every process's 1-D ``x`` (sizes may differ)."""
    sizes = multihost_utils.process_allgather(np.asarray([len(x)])).reshape(-1)
    padded = np.zeros(int(sizes.max()), x.dtype)
    padded[:len(x)] = x
    stacked = multihost_utils.process_allgather(padded)
    return np.concatenate([stacked[i, :n] for i, n in enumerate(sizes)])


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
        data=DataConfig(kind=D.pretrain_kind(d.kind), tasks=b.pretrain_tasks, seq_len=d.seq_len,
                        tokenizer=d.tokenizer, seed=d.seed),
        optim=OptimConfig(lr=b.pretrain_lr),
        train=TrainConfig(steps=b.pretrain_steps, batch_size=b.pretrain_batch_size,
                          eval_every=b.pretrain_steps, checkpoint_every=500),
    )


BASE_FORMAT = "params/ (orbax)"  # of a cached base: a new format means new cache keys


def base_params(cfg: Experiment, model, hf_params, example, *, mesh=None):
    """The frozen base: HF checkpoint, fresh init, or the cached pretrained model.

    With ``mesh`` (``sharding.make_mesh(cfg.mesh)``) the base is created in its shards, by
    ``cfg.mesh``'s rules: an init by ``sharding.init_sharded`` (a jitted init whose outputs are
    sharded), a checkpoint that ``build_model(weights=False)`` did not read (``hf_params`` None)
    by ``hf_sharded.load_hf_sharded`` (each host reads its shards' bytes), the cached pretrained
    base by ``io.load_params(like=...)`` (orbax reads each host's shards alone; no host holds a
    whole leaf), a checkpoint the caller loaded whole (``hf_params``) placed by ``sharding.put``.
    Without it: one device's arrays, or the cached base's host arrays (what the callers that
    place trees themselves expect).

    Pretraining holds a lock on the cache folder (``WorkdirLock(name='base', wait=True)``): a
    second process that needs the same uncached base waits for the first, logging its pid, then
    loads the cached base. None if SIGTERM interrupted the pretraining (it resumes on the next
    run; a waiting process then pretrains it itself).
    """
    rules = None if mesh is None else sharding.logical_rules(cfg.mesh)
    like = lambda: sharding.base_shapes(model, example, mesh, rules)
    place = lambda p: p if mesh is None else sharding.put(
        p, jax.tree.map(lambda x: x.sharding, like()), may_alias=True)
    read = lambda path: io.load_params(path, None if mesh is None else like())
    if cfg.base.source == "hf":
        if not cfg.model.hf_path:
            raise ValueError("base.source='hf' needs model.hf_path")
        if hf_params is not None:
            return place(hf_params)
        mc = cfg.model
        args = dict(scan_layers=mc.scan_layers, remat=mc.remat, dtype=jnp.dtype(mc.dtype),
                    param_dtype=jnp.dtype(mc.param_dtype))
        args["overrides"] = _overrides(mc.overrides)  # a BERT checkpoint's head
        if mesh is None:
            return models.load_hf_checkpoint(mc.hf_path, **args)[1]
        return hf_sharded.load_hf_sharded(mc.hf_path, mesh, rules, **args)[1]
    if cfg.base.source == "init":
        if mesh is not None:
            return sharding.init_sharded(model, example, mesh, rules, cfg.base.seed)
        return jax.jit(lambda k: lj.transform._unbox(model.init(k, example)["params"]))(
            jax.random.key(cfg.base.seed))
    if cfg.base.source != "pretrain":
        raise ValueError(f"unknown base.source {cfg.base.source!r}; use 'pretrain', 'init', 'hf'")
    pre = pretrain_experiment(cfg)
    # Runtime fields do not change the base: a new one must not invalidate every cached base.
    train = {k: v for k, v in to_dict(pre.train).items() if k not in RUNTIME_FIELDS}
    # not mesh; the export format is in the key, since a complete cached run in an older format
    # is not retrained (its summary.json stands) and so would never write ``params/``
    key = fingerprint(pre.model, pre.data, pre.base, pre.optim, train, pre.seed, BASE_FORMAT)
    workdir = _cache_dir(cfg) / f"base-{cfg.model.family}-{cfg.model.preset}-{key}"
    path = workdir / "params"
    if path.exists():
        log(f"base model: cached at {workdir}")
        return read(path)
    # One process pretrains into the cache; another that needs the same base waits, then loads it.
    with wd.WorkdirLock(workdir, jax.process_index(), name="base", wait=True,
                        log=lambda m: log(f"base model: {m} while it pretrains this base; "
                                          "this run loads it from the cache when it is done")):
        if path.exists():
            log(f"base model: cached at {workdir} (pretrained by another process meanwhile)")
        else:
            log(f"base model: pretraining on {', '.join(pre.data.tasks)} "
                f"({pre.train.steps} steps; cached at {workdir})")
            if train_and_evaluate(pre, workdir).get("interrupted"):
                return None
    return read(path)


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


def make_schedule(oc, total_steps: int) -> optax.Schedule:
    """The learning rate at each optimizer step (0-based): warm-up, then cosine or constant."""
    if oc.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, oc.lr, min(oc.warmup_steps, total_steps),
                                                  max(total_steps, oc.warmup_steps + 1))
    if oc.schedule == "constant":
        return optax.linear_schedule(0.0, oc.lr, max(oc.warmup_steps, 1))
    raise ValueError(f"unknown optim.schedule {oc.schedule!r}; use 'cosine' or 'constant'")


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
    """The base optimizer with its schedule (no clipping: ``clipped`` adds it around the whole
    trainable tree, so LoRA+'s groups are clipped together)."""
    lr = make_schedule(oc, total_steps)
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
    forward: Callable  # (trainable, frozen, inputs (a tuple), task_ids, rng, train) -> logits
    penalty: Callable  # (trainable, frozen) -> scalar added to the loss (methods' regularisers)
    tx: optax.GradientTransformation
    export: Callable  # (trainable, frozen, workdir) -> None; every process calls it
    methods: tuple = ()  # the adapter methods (empty for full fine-tuning)
    lr: Callable | None = None  # the base learning-rate schedule (logged; groups may scale it)
    objective: Objective = LM  # the data kind's model inputs, loss and scores


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
        return model.apply({"params": trainable}, *inputs, deterministic=not train,
                           rngs=_rngs(rng))

    tx = clipped(cfg.optim, make_optimizer(cfg.optim, cfg.train.steps))

    def export(trainable, frozen, workdir):  # every process writes its shards
        io.save_params(workdir / "params", trainable)

    return Setup(params, {}, forward, lambda t, f: 0.0, tx, export,
                 lr=make_schedule(cfg.optim, cfg.train.steps))


def adapter_setup(cfg: Experiment, model, params, example, mesh=None) -> Setup:
    """Adapters of ``cfg.method`` on the frozen base: init (in their shards on ``mesh``), the
    method's base transform (PiSSA's residual), the split into trainable arrays and frozen state,
    the method's optimizer."""
    spec = adapter_spec(cfg)
    layouts = lj.trace_layouts(model, params, example)
    key = jax.random.key(cfg.seed + 1)
    if mesh is None:
        adapters = lj.init_adapters(params, spec, key, layouts=layouts)
    else:
        adapters, _ = sharding.init_adapters_sharded(
            params, spec, key, sharding.param_logical_specs(model, example), mesh,
            sharding.logical_rules(cfg.mesh), layouts=layouts)
    params, adapters = lj.transform_base(params, adapters)
    trainable, state = lj.split(adapters)
    tx = clipped(cfg.optim, lj.adapter_optimizer(make_optimizer(cfg.optim, cfg.train.steps),
                                                 trainable))
    log(lj.summary(params, adapters))

    def forward(trainable, frozen, inputs, task_ids, rng, train):
        return lj.apply(model, frozen["params"], lj.join(trainable, frozen["state"]), *inputs,
                        train=train, task_ids=task_ids, rngs=_rngs(rng),
                        deterministic=not train)

    def export(trainable, frozen, workdir):  # gathered adapters (gather_for_export)
        if jax.process_index() != 0:
            return
        meta = {"spec": to_dict(cfg.adapter), "method": cfg.method,
                "method_args": dict(cfg.method_args), "model": to_dict(cfg.model)}
        io.save_adapters(workdir / "adapter", lj.join(trainable, frozen["state"]), meta)

    penalty = lambda t, f: lj.regularizer(lj.join(t, f["state"]))
    return Setup(trainable, {"params": params, "state": state}, forward, penalty, tx, export,
                 tuple(methods.methods_of(adapters)), make_schedule(cfg.optim, cfg.train.steps))


def make_setup(cfg: Experiment, model, params, example, mesh=None) -> Setup:
    """The run's ``Setup``; with ``mesh`` the adapters are created in their shards."""
    setup = (full_setup(cfg, model, params) if cfg.full_finetune
             else adapter_setup(cfg, model, params, example, mesh))
    return dataclasses.replace(setup, objective=objective_for(cfg.data.kind))


def make_loss(setup: Setup, sh: sharding.TrainShardings | None = None) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng) -> scalar``: the objective's loss (the token loss
    for language modelling) plus the methods' penalty."""
    forward = setup.forward if sh is None else sharding.batch_sharded(setup.forward, sh.mesh)
    objective = setup.objective

    def loss_fn(trainable, frozen, batch, rng):
        logits = forward(trainable, frozen, objective.model_inputs(batch), batch["task_ids"], rng,
                         True)
        return objective.loss(logits, batch) + setup.penalty(trainable, frozen)

    return loss_fn


def make_steps(setup: Setup, sh: sharding.TrainShardings | None = None, microbatches: int = 1):
    """The jitted train and eval steps of a ``Setup``; the train step leaves the state unchanged
    on a non-finite step (``metrics['finite']`` is False then) and accumulates gradients over
    ``microbatches`` slices of each batch (``steps.make_train_step``)."""
    forward = setup.forward if sh is None else sharding.batch_sharded(setup.forward, sh.mesh)
    return (make_train_step(make_loss(setup, sh), setup.tx, sh, guard_nonfinite=True,
                            microbatches=microbatches, weight=setup.objective.weight),
            make_eval_step(forward, sh, setup.objective))


def shard_setup(cfg: Experiment, model, example, setup: Setup,
                mesh=None) -> sharding.TrainShardings:
    """The shardings of the step's arguments (lora_jax.sharding) on ``mesh`` (default: the mesh
    of ``cfg.mesh``)."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    sharding.check_batch(cfg.train.batch_size, mesh)
    if cfg.train.microbatches > 1:
        sharding.check_batch(cfg.train.batch_size // cfg.train.microbatches, mesh,
                             "train.batch_size / train.microbatches")
    sharding.check_batch(cfg.train.eval_batch_size, mesh, "train.eval_batch_size")
    specs = sharding.param_logical_specs(model, example)
    log(f"mesh {dict(mesh.shape)} (preset {cfg.mesh.preset!r}) over {jax.process_count()} "
        f"process(es)")
    sh = sharding.train_shardings(mesh, sharding.logical_rules(cfg.mesh), specs,
                                  setup.trainable, setup.frozen, setup.tx)
    if cfg.mesh.max_replicated_mib:  # MaxText's assert_params_sufficiently_sharded
        limit = int(cfg.mesh.max_replicated_mib * 2**20)
        sharding.check_sharded(sh.trainable, setup.trainable, limit)
        sharding.check_sharded(sh.frozen, setup.frozen, limit)
        sharding.check_sharded(sh.opt_state, jax.eval_shape(setup.tx.init, setup.trainable),
                               limit)
    return sh


def prepare(cfg: Experiment, model, hf_params, example):
    """``(setup, sh)``: the base, the adapters and their shardings, every tree born in its shards
    on ``cfg.mesh`` (``base_params(mesh=)``, ``make_setup(mesh=)``); None if SIGTERM interrupted
    the start-up. ``setup.trainable`` and ``setup.frozen`` are the placed trees themselves
    (``sharding.put(may_alias=True)``: nothing is copied, and no unplaced copy stays alive once
    the caller drops ``hf_params``); the train step donates ``setup.trainable``.
    """
    mesh = sharding.make_mesh(cfg.mesh)
    params = base_params(cfg, model, hf_params, example, mesh=mesh)
    if params is None or PREEMPTION.requested_anywhere():
        return None
    params = quantize_base(cfg, model, params, example)
    setup = make_setup(cfg, model, params, example, mesh)
    del params  # the setup holds the base (transformed by the method, e.g. PiSSA's residual)
    sh = shard_setup(cfg, model, example, setup, mesh)
    trainable, frozen = sharding.put((setup.trainable, setup.frozen), (sh.trainable, sh.frozen),
                                     may_alias=True)
    return dataclasses.replace(setup, trainable=trainable, frozen=frozen), sh


def validate(cfg: Experiment) -> None:
    """Checks everything cheap to check before a workdir is touched: the method and its
    arguments, model family/preset (or HF config), data, base source, optimizer and schedule.

    A wrong value raises ``ValueError`` naming it, so a corrected command is never refused by a
    ``run.json`` written by the bad one.
    """
    if not cfg.full_finetune:
        build_method(cfg)  # the method validates its own arguments
        adapter_spec(cfg)
    check_data(cfg.data)
    kind = D.get_kind(cfg.data.kind)
    check_model(cfg.model, D.vocab_size(kind.tokenizer(cfg.data)))
    if cfg.train.eval_generate and kind.objective != "lm":
        raise ValueError(f"train.eval_generate decodes text; data.kind={cfg.data.kind!r} is "
                         "classification: set it False")
    if cfg.base.source not in ("pretrain", "init", "hf"):
        raise ValueError(f"unknown base.source {cfg.base.source!r}; use 'pretrain', 'init', 'hf'")
    if cfg.base.source == "hf" and not cfg.model.hf_path:
        raise ValueError("base.source='hf' needs model.hf_path=DIR (a Hugging Face checkpoint)")
    make_optimizer(cfg.optim, cfg.train.steps)
    t = cfg.train
    for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every",
                 "checkpoint_every", "keep_checkpoints", "microbatches"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.batch_size % t.microbatches:
        raise ValueError(f"train.batch_size={t.batch_size} does not split into "
                         f"train.microbatches={t.microbatches} equal slices; use a divisor")


# ----------------------------------------------------------------------------- the loop


class Preemption:
    """SIGTERM as a flag the trainer checks at safe points (setup done, every step).

    ``PREEMPTION.install()`` is called as early as possible (the launcher calls it before its
    heavy imports through ``request()`` of a signal it caught itself), so a SIGTERM at any moment
    of a run (start-up and pretraining included) ends it with a checkpoint and exit 0, never
    with -15; once the last step is done, a SIGTERM is ignored and the run finishes (final eval,
    export, summary). Only the main thread can install it; elsewhere the flag is never set.
    In a multi-process run, JAX's preemption service takes SIGTERM over after
    ``jax.distributed.initialize``; ``should_stop`` then asks its sync point, so every process
    stops at the same step.
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

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop before ``step``; the same answer on every process.

        Every process must call it at every step (JAX's sync point requires it).
        """
        if jax.process_count() == 1:
            return self.requested
        try:
            synced = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # jax_enable_preemption_service=False: our own flag only
            synced = False
        return _any_process(self.requested) or synced

    def requested_anywhere(self) -> bool:
        """The flag, or'ed over processes (a collective: every process must call it)."""
        return _any_process(self.requested)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


PREEMPTION = Preemption()


class NonFiniteError(RuntimeError):
    """A step's loss, gradient norm or update was NaN/inf; the run stopped (last good state kept)."""


RUNTIME_FIELDS = ("eval_every", "eval_batch_size", "log_every", "checkpoint_every",
                  "keep_checkpoints", "async_checkpoints", "skip_nonfinite", "allow_data_change",
                  "eval_generate", "microbatches")


def run_identity(cfg: Experiment) -> dict:
    """What ``run.json`` records as the run's identity: the config without the runtime fields
    (``RUNTIME_FIELDS``) and the mesh, which a resumed run may change."""
    d = to_dict(cfg)
    for k in RUNTIME_FIELDS:
        d["train"].pop(k)
    d.pop("mesh")  # a run may resume on another topology (process count, mesh shape)
    return _finite_json(d)


def _finite_json(x):
    """``x`` with NaN/inf floats as strings ('nan', 'inf'), so it is valid JSON (``lr=nan``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_finite_json(v) for v in x)
    return x


def _accuracy_table(base: dict, final: dict) -> str:
    names = [k for k in final if k != "mean"] + ["mean"]
    width = max(len(n) for n in names)
    lines = [f"{'task'.ljust(width)}  base    adapted"]
    lines += [f"{n.ljust(width)}  {base.get(n, float('nan')):.3f}   {final[n]:.3f}" for n in names]
    return "\n".join(lines)


def _interrupted(workdir, step: int, what: str) -> dict:
    PREEMPTION.requested = False  # honoured: a later run in this process starts afresh
    log(f"SIGTERM: {what}; rerun the same command to resume from step {step} in {workdir}")
    return {"interrupted": True, "step": step}


def train_and_evaluate(cfg: Experiment, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) the experiment in ``workdir``; returns the summary it writes.

    Writes ``run.json`` (identity, plus the environment and data digests of the first launch),
    ``checkpoints/``, ``progress.json`` (train time and last loss of the newest checkpoint),
    ``metrics.jsonl``, ``tb/``, the export (``adapter/`` or ``params/``) and
    ``summary.json``, every JSON file atomically. The config is validated before the workdir is
    touched, and the workdir is locked while the run lives (``workdir.WorkdirBusy`` otherwise).
    If SIGTERM arrives, the current state is checkpointed and the function returns
    ``{'interrupted': True, 'step': N}`` without a summary. A NaN/inf step raises
    ``NonFiniteError`` (unless ``train.skip_nonfinite``). A completed run is never rewritten:
    rerunning it returns its summary. See docs/reliability.md.
    """
    PREEMPTION.install()
    validate(cfg)
    distributed.initialize(cfg.mesh)
    workdir = Path(workdir)
    with wd.WorkdirLock(workdir, jax.process_index()):
        return _run(cfg, workdir)


def launch_record(cfg: Experiment) -> dict:
    """What ``run.json`` records of the first launch besides the identity: the environment and
    the data files' digests (``checkpoint.check_identity``'s ``recorded``)."""
    return {"environment": wd.environment(), "data": wd.data_digests(data_files(cfg.data))}


def _last_logged_loss(workdir: Path, step: int) -> float | None:
    """The newest train loss in ``metrics.jsonl`` at or before ``step`` (None if none)."""
    path, loss = workdir / "metrics.jsonl", None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if r.get("split") == "train" and r.get("step", step + 1) <= step and "loss" in r:
                loss = r["loss"]
    return loss


def read_progress(workdir: Path, start: int) -> dict:
    """``{'train_seconds', 'train_loss', 'skipped_steps'}`` up to checkpoint ``start``.

    ``progress.json`` is written right after each checkpoint; if the kill came in between (or
    restore fell back to an older step), the newest record at or before ``start`` is used.
    """
    path = workdir / "progress.json"
    rec = wd.read_json(path, "delete it: only train_seconds of earlier segments are lost") \
        if path.exists() else {}
    hist = {int(k): v for k, v in rec.get("steps", {}).items() if int(k) <= start}
    got = hist[max(hist)] if hist else {}
    loss = got.get("train_loss") if got.get("step") == start else None
    return {"train_seconds": got.get("train_seconds", 0.0),
            "train_loss": loss if loss is not None else _last_logged_loss(workdir, start),
            "skipped_steps": got.get("skipped_steps", 0)}


def write_progress(workdir: Path, step: int, keep: int, **values) -> None:
    """Records ``values`` for checkpoint ``step`` (the newest ``keep + 1`` records are kept)."""
    if jax.process_index() != 0:
        return
    path = workdir / "progress.json"
    steps = wd.read_json(path, "delete it").get("steps", {}) if path.exists() else {}
    steps[str(step)] = {"step": step, **values}
    newest = sorted(steps, key=int)[-(keep + 1):]
    wd.write_json(path, {"steps": {k: steps[k] for k in newest}})


def _run(cfg: Experiment, workdir: Path) -> dict:
    first = checkpoint.check_identity(workdir, run_identity(cfg), recorded=launch_record(cfg))
    if (workdir / "summary.json").exists():
        summary = wd.read_json(workdir / "summary.json",
                               "delete it to rerun the final evaluation and export")
        log(f"{workdir} is complete (summary.json); nothing to do")
        return summary
    for line in wd.check_data_unchanged(first.get("data", {}),
                                        allow_change=cfg.train.allow_data_change):
        log(line)
    kind = D.get_kind(cfg.data.kind)
    tokenizer = kind.tokenizer(cfg.data)
    model, _, hf_params = build_model(cfg.model, D.vocab_size(tokenizer), weights=False)
    train_arrays, eval_arrays, tasks = load_data(cfg.data, tokenizer, jax.process_index(),
                                                 jax.process_count())
    example = jnp.asarray(kind.example(cfg.data))
    prepared = prepare(cfg, model, hf_params, example)
    del hf_params  # a base loaded whole (BERT) now lives only in its shards
    if prepared is None:
        return _interrupted(workdir, 0, "during start-up")
    setup, sh = prepared
    train_step, eval_step = make_steps(setup, sh, cfg.train.microbatches)
    loss_fn = make_loss(setup, sh)
    loader = D.ArrayLoader(train_arrays, cfg.train.batch_size, seed=cfg.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())
    info = {"method": cfg.method, "ranks": None if cfg.full_finetune else cfg.adapter.rank}
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", cfg.train.keep_checkpoints,
                                   info=info, async_save=cfg.train.async_checkpoints, log=log)
    metrics = MetricsWriter(workdir) if jax.process_index() == 0 else distributed.NullWriter()
    try:
        return _train(cfg, workdir, setup, sh, train_step, eval_step, loss_fn, loader, ckpts,
                      metrics, train_arrays, eval_arrays, tasks, model)
    finally:
        ckpts.close()
        metrics.close()


def _train(cfg, workdir, setup, sh, train_step, eval_step, loss_fn, loader, ckpts, metrics,
           train_arrays, eval_arrays, tasks, model) -> dict:
    """Restore, base eval, the loop, the final eval, export and summary (``_run``'s second half)."""
    trainable, frozen = setup.trainable, setup.frozen  # placed by prepare
    opt_state = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(trainable)
    start, (trainable, opt_state) = ckpts.restore_latest((trainable, opt_state))
    evals = D.EvalLoader(eval_arrays, cfg.train.eval_batch_size, allgather=_allgather,
                         process_index=jax.process_index(), process_count=jax.process_count())
    run_eval = lambda t, f: evaluate(eval_step, t, f, evals, tasks)  # each process: its share
    run = methods.Run(model=model, train_arrays=train_arrays, tasks=tuple(tasks),
                      steps=cfg.train.steps, seed=cfg.seed, workdir=workdir, evaluate=run_eval,
                      log=log, inputs=setup.objective.inputs)
    callbacks = [c for c in (m.callback(run) for m in setup.methods) if c is not None]
    for c in callbacks:  # e.g. LoSA: masks change between segments
        frozen = c.restore(start, frozen)
    base_file = workdir / "base_eval.json"
    if base_file.exists():
        base_eval = wd.read_json(base_file, "delete it and rerun to recompute the base evaluation")
    else:
        base_eval = run_eval(trainable, frozen)
        metrics.write_config(to_dict(cfg))
        metrics.write(0, "eval", **base_eval)
        if jax.process_index() == 0:
            wd.write_json(base_file, base_eval)
    if start:
        log(f"resuming from step {start}")
    done = read_progress(workdir, start) if start else {}
    train_time = done.get("train_seconds", 0.0)
    loss, skipped = done.get("train_loss"), done.get("skipped_steps", 0)
    saved = start  # the newest checkpoint known good
    schedule = lambda s: float(setup.lr(s)) if setup.lr is not None else None
    progress = Progress(cfg.train.steps, cfg.train.batch_size, start,
                        cfg.data.seq_len if D.get_kind(cfg.data.kind).tokens else None)
    key = jax.random.key(cfg.seed + 2)

    def save(step):
        nonlocal saved
        if step > saved:
            ckpts.save(step, (trainable, opt_state))
            write_progress(workdir, step, cfg.train.keep_checkpoints, train_seconds=train_time,
                            train_loss=loss, skipped_steps=skipped)
            saved = step

    step = start
    for step in range(start + 1, cfg.train.steps + 1):
        if PREEMPTION.should_stop(step):
            save(step - 1)
            return _interrupted(workdir, step - 1, f"checkpointed step {step - 1}" if step > 1
                                else "before the first step")
        for c in callbacks:
            frozen = c(step, trainable, frozen)
        t0 = time.perf_counter()
        batch = sharding.shard_batch(loader.batch(step - 1), sh.mesh)
        rng = jax.random.fold_in(key, step)
        trainable, opt_state, out = train_step(trainable, opt_state, frozen, batch, rng)
        if not bool(out["finite"]):
            if not cfg.train.skip_nonfinite:
                raise _nonfinite_error(step, out, loss_fn, setup.tx, trainable, opt_state,
                                       frozen, batch, rng, saved, ckpts)
            skipped += 1
            log(f"step {step}: non-finite loss or gradients; step skipped ({skipped} so far)")
        train_time += time.perf_counter() - t0
        if step == start + 1:
            progress.mark(step)  # rates and ETA from post-compile step times
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            if bool(out["finite"]):
                loss = float(out["loss"])
            rates = progress.report(step)
            metrics.write(step, "train", loss=float(out["loss"]), grad_norm=float(out["grad_norm"]),
                          lr=schedule(step - 1), skipped_steps=skipped, **rates)
            log(f"step {step}/{cfg.train.steps}  loss {float(out['loss']):.4f}  "
                f"{progress.describe(rates)}  ETA {format_duration(rates['eta_sec'])}")
        if step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            ev = run_eval(trainable, frozen)
            metrics.write(step, "eval", **ev)
            log(f"eval @ {step}: loss {ev['loss']:.4f}  accuracy {ev['accuracy']['mean']:.3f}")
        if step % cfg.train.checkpoint_every == 0:
            save(step)
    save(step)  # from here on a SIGTERM is ignored: the run finishes
    ckpts.wait()
    final = run_eval(trainable, frozen)
    metrics.write(step, "eval", **final)
    # Every process: adapters gathered (the base stays in its shards); full fine-tuning's model
    # is written in its shards by its export.
    exported = (trainable, frozen) if cfg.full_finetune else \
        sharding.gather_for_export(trainable, frozen)
    setup.export(*exported, workdir)
    summary = summary_record(cfg, trainable, frozen, step, train_time, loss, final, base_eval,
                             skipped)
    if cfg.train.eval_generate:  # exact match by real greedy decoding, beside teacher forcing
        summary["accuracy_generated"] = generated_accuracy(setup, model, trainable, frozen,
                                                           eval_arrays, tasks)
        log(f"exact match by greedy decoding: {summary['accuracy_generated']['mean']:.3f} "
            f"(teacher-forced: {final['accuracy']['mean']:.3f})")
    for c in callbacks:
        summary.update(c.finish(*exported, workdir))
    if jax.process_index() == 0:
        wd.write_json(workdir / "summary.json", summary)
    log(_accuracy_table(base_eval["accuracy"], final["accuracy"]))
    log(f"eval loss {base_eval['loss']:.4f} -> {final['loss']:.4f} | trainable params "
        f"{summary['trainable_params']:,} of {summary['total_params']:,} | train time {format_duration(train_time)}")
    return summary


def summary_record(cfg: Experiment, trainable, frozen, step: int, train_time: float,
                   loss: float, final: dict, base_eval: dict, skipped: int) -> dict:
    """The ``summary.json`` keys every run has (solo and batched); callers add their own.

    Throughput: ``examples_per_sec`` always, ``tokens_per_sec`` (examples × ``data.seq_len``)
    only for a data kind whose rows are tokens (not for images)."""
    n_train = lj.count_params(trainable)
    n_base = lj.count_params(frozen.get("params", {}))
    rate = lambda n: n * cfg.train.batch_size * step / train_time if train_time > 0 else None
    per_token = {"tokens_per_sec": rate(cfg.data.seq_len)} if D.get_kind(cfg.data.kind).tokens \
        else {}
    return {
        "method": cfg.method,
        "model": f"{cfg.model.family}/{cfg.model.preset}" if not cfg.model.hf_path
        else cfg.model.hf_path,
        "trainable_params": n_train,
        "total_params": n_base + n_train,
        "steps": step,
        "train_seconds": train_time,
        "final_train_loss": loss,
        "final_eval_loss": final["loss"],
        "base_eval_loss": base_eval["loss"],
        "base_accuracy": base_eval["accuracy"],
        "accuracy": final["accuracy"],
        "examples_per_sec": rate(1),
        **per_token,
        "skipped_steps": skipped,
    }


def generated_accuracy(setup: Setup, model, trainable, frozen, arrays, tasks) -> dict:
    """Per-task exact match of real greedy decoding (``lj.greedy_exact_match``) on ``arrays``."""
    if setup.methods:
        params, adapters = frozen["params"], lj.join(trainable, frozen["state"])
    else:
        params, adapters = trainable, {}
    correct = lj.greedy_exact_match(model, params, adapters, arrays)
    return D.per_task_accuracy(correct, arrays["task_ids"], list(tasks))


def _nonfinite_error(step, out, loss_fn, tx, trainable, opt_state, frozen, batch, rng, saved,
                     ckpts) -> NonFiniteError:
    """The one-line error for a non-finite step (the guarded step left the state before it)."""
    leaf = first_nonfinite_leaf(loss_fn, tx, trainable, opt_state, frozen, batch, rng)
    kept = (f"the last good checkpoint is step {saved} in {ckpts.directory} (kept)" if saved
            else "no checkpoint was saved before it")
    return NonFiniteError(
        f"step {step}: non-finite training (loss {float(out['loss'])}, gradient norm "
        f"{float(out['grad_norm'])}); first non-finite: {leaf}; {kept}. Lower optim.lr or "
        "check the data, then rerun to resume; or set --config.train.skip_nonfinite=True to "
        "skip such steps")
