"""Vision adaptation on the bundled digits: a ViT pretrained once on digits 0–4, adapted to views
and classes it never saw with LoRA, DoRA, full fine-tuning and a linear probe, over seeds.

    python -m experiments.vision                      # the table in docs/vision.md
    python -m experiments.vision --seeds=0 --adapt_steps=50 --pretrain_steps=200   # a smoke run

The base (`ViT` preset 'digits', trained from scratch on `plain_0to4`) is cached under
$LORA_JAX_CACHE or ~/.cache/lora_jax (`vision/`), keyed by what defines it, so reruns only adapt.
Every method starts from the same base; LoRA and DoRA adapt the 'all-linear' kernels and train the
head as a module to save, the linear probe trains only the head (a `modules_to_save` spec with no
targets), full fine-tuning trains every parameter. This script is its own short loop over the
library's API (`trace_layouts`, `init_adapters`, `apply`, `adapter_optimizer`), one held-out task
per run; `configs/vit_lora.py` makes the same comparison through the trainer, all four tasks in
one run (docs/vision.md has both). Prints a markdown table: base accuracy, adapted accuracy
mean ± std over seeds, accuracy on the base task after adapting (forgetting), trainable
parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import serialization

import lora_jax as lj
from lora_jax.data import ArrayLoader
from lora_jax.data import images as im
from lora_jax.models import get_model

METHODS = ("lora", "dora", "full", "linear_probe")
HEAD = (r"head/(kernel|bias)",)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Everything the experiment depends on; the base's cache key uses the `pretrain_*` fields."""

    preset: str = "digits"
    base_task: str = im.BASE_TASK
    held_out: tuple[str, ...] = im.HELD_OUT
    pretrain_steps: int = 1000
    pretrain_lr: float = 1e-3
    batch_size: int = 64
    adapt_steps: int = 100
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("all-linear",)
    # Picked per method from 2-3 values (docs/vision.md says how); peak of a cosine decay.
    lrs: tuple[tuple[str, float], ...] = (("lora", 3e-3), ("dora", 1e-2), ("full", 3e-3),
                                          ("linear_probe", 3e-2))
    seeds: tuple[int, ...] = (0, 1, 2)


# ----------------------------------------------------------------------------- training pieces


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits (B, classes) against int labels (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(forward, tx):
    """A jitted step `(trainable, opt_state, frozen, images, labels) -> (trainable, opt_state,
    loss)`; `forward(trainable, frozen, images)` gives logits (B, classes)."""

    def loss_fn(trainable, frozen, images, labels):
        return cross_entropy(forward(trainable, frozen, images), labels)

    @jax.jit
    def step(trainable, opt_state, frozen, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, labels)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(step, tx, trainable, frozen, data, steps: int, batch_size: int, seed: int):
    """Runs `steps` steps of `step` over `data` (images, labels) batches; returns trainable."""
    loader = ArrayLoader({"images": data["images"], "labels": data["labels"]}, batch_size, seed)
    opt_state = tx.init(trainable)
    for i in range(steps):
        batch = loader.batch(i)
        trainable, opt_state, _ = step(trainable, opt_state, frozen, batch["images"],
                                       batch["labels"])
    return trainable


def evaluate(predict, *args, data) -> float:
    """Accuracy of `predict(*args, images)` logits on `data`."""
    return im.accuracy(np.asarray(predict(*args, data["images"])), data["labels"])


# ----------------------------------------------------------------------------- the base


def _cache_path(cfg: VisionConfig) -> Path:
    root = Path(os.environ.get("LORA_JAX_CACHE") or "~/.cache/lora_jax").expanduser()
    key = json.dumps([cfg.preset, cfg.base_task, cfg.pretrain_steps, cfg.pretrain_lr,
                      cfg.batch_size, im.SPLIT_SEED])
    return root / "vision" / f"vit-{hashlib.sha256(key.encode()).hexdigest()[:12]}.msgpack"


def pretrained_base(cfg: VisionConfig, model: nn.Module) -> dict:
    """The base ViT params, trained from seed 0 on `cfg.base_task` (cached on disk)."""
    path = _cache_path(cfg)
    example = jnp.zeros((1, im.IMAGE_SIZE, im.IMAGE_SIZE, 1))
    init = nn.meta.unbox(model.init(jax.random.key(0), example)["params"])
    if path.exists():
        return serialization.from_bytes(init, path.read_bytes())
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.pretrain_lr, cfg.pretrain_steps))
    step = make_step(lambda p, _, x: model.apply({"params": p}, x), tx)
    t0 = time.perf_counter()
    data = im.make_image_dataset([cfg.base_task], "train")
    params = train(step, tx, init, None, data, cfg.pretrain_steps, cfg.batch_size, seed=0)
    print(f"pretrained the base on {cfg.base_task} in {time.perf_counter() - t0:.0f} s "
          f"-> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(jax.device_get(params)))
    return params


# ----------------------------------------------------------------------------- the methods


def adapter_spec(cfg: VisionConfig, method: str) -> lj.LoraSpec:
    """The adapter spec of a method; the linear probe is a head-only `modules_to_save`."""
    if method == "linear_probe":
        return lj.LoraSpec(targets=(), modules_to_save=HEAD)
    return lj.LoraSpec(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, method=method,
                       modules_to_save=HEAD)


class Method:
    """One method's compiled step and predictor, reused across tasks and seeds (one compile)."""

    def __init__(self, cfg: VisionConfig, name: str, model: nn.Module, base: dict, layouts):
        self.name, self.cfg, self.base, self.layouts = name, cfg, base, layouts
        lr = dict(cfg.lrs)[name]
        schedule = optax.cosine_decay_schedule(lr, cfg.adapt_steps)
        if name == "full":
            forward = lambda p, _, x: model.apply({"params": p}, x)
            self.tx = optax.adamw(schedule)
        else:
            forward = lambda t, frozen, x: lj.apply(model, frozen[0], lj.join(t, frozen[1]), x)
            trainable, _ = lj.split(self._adapters(0))
            self.tx = lj.adapter_optimizer(optax.adamw(schedule), trainable)
        self.step = make_step(forward, self.tx)
        self.predict = jax.jit(forward)

    def _adapters(self, seed: int):
        return lj.init_adapters(self.base, adapter_spec(self.cfg, self.name),
                                jax.random.key(seed), layouts=self.layouts)

    def adapt(self, data: dict, seed: int):
        """Returns `(trainable, frozen, n_trainable)` after adapting to `data` from the base."""
        if self.name == "full":
            trainable, frozen = self.base, None
        else:
            trainable, state = lj.split(self._adapters(seed))
            frozen = (self.base, state)
        trainable = train(self.step, self.tx, trainable, frozen, data, self.cfg.adapt_steps,
                          self.cfg.batch_size, seed)
        return trainable, frozen, lj.count_params(trainable)


# ----------------------------------------------------------------------------- the experiment


def run(cfg: VisionConfig) -> list[dict]:
    """Pretrains (or loads) the base, adapts it per held-out task, method and seed.

    Returns one row per (task, method): base and adapted accuracies, the base task's accuracy
    after adapting, and the trainable parameter count.
    """
    model, _ = get_model("vit", cfg.preset)
    base = pretrained_base(cfg, model)
    layouts = lj.trace_layouts(model, base, jnp.zeros((1, im.IMAGE_SIZE, im.IMAGE_SIZE, 1)))
    predict_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    base_eval = im.make_image_dataset([cfg.base_task], "eval")
    print(f"base: {cfg.base_task} eval accuracy {evaluate(predict_base, base, data=base_eval):.3f}")
    methods = {name: Method(cfg, name, model, base, layouts) for name in METHODS}
    rows = []
    for task in cfg.held_out:
        train_data = im.make_image_dataset([task], "train")
        eval_data = im.make_image_dataset([task], "eval")
        before = evaluate(predict_base, base, data=eval_data)
        for name, method in methods.items():
            t0 = time.perf_counter()
            accs, kept, n_train = [], [], 0
            for seed in cfg.seeds:
                trainable, frozen, n_train = method.adapt(train_data, seed)
                accs.append(evaluate(method.predict, trainable, frozen, data=eval_data))
                kept.append(evaluate(method.predict, trainable, frozen, data=base_eval))
            rows.append(dict(task=task, method=name, base=before, acc_mean=float(np.mean(accs)),
                             acc_std=float(np.std(accs)), accs=accs,
                             base_task_after=float(np.mean(kept)), trainable=int(n_train),
                             seconds=time.perf_counter() - t0))
            print(f"  {task:12s} {name:12s} {before:.3f} -> {np.mean(accs):.3f} ± "
                  f"{np.std(accs):.3f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def table(rows: list[dict], n_base: int) -> str:
    """Markdown table of `run`'s rows, with a per-method mean over tasks at the end."""
    lines = ["| task | method | base acc | adapted acc (mean ± std) | base task after | "
             "trainable params |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['base']:.3f} | {r['acc_mean']:.3f} ± "
                     f"{r['acc_std']:.3f} | {r['base_task_after']:.3f} | "
                     f"{r['trainable']:,} ({100 * r['trainable'] / n_base:.1f}%) |")
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        lines.append(f"| **mean** | {m} | {np.mean([r['base'] for r in mine]):.3f} | "
                     f"{np.mean([r['acc_mean'] for r in mine]):.3f} | "
                     f"{np.mean([r['base_task_after'] for r in mine]):.3f} | "
                     f"{mine[0]['trainable']:,} |")
    return "\n".join(lines)


_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Adaptation seeds.")
_ADAPT_STEPS = flags.DEFINE_integer("adapt_steps", VisionConfig.adapt_steps, "Steps per run.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", VisionConfig.pretrain_steps,
                                       "Base pretraining steps (part of the cache key).")
_OUT = flags.DEFINE_string("out", "", "Optional path for the rows as JSON.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = VisionConfig(seeds=tuple(int(s) for s in _SEEDS.value),
                       adapt_steps=_ADAPT_STEPS.value, pretrain_steps=_PRETRAIN_STEPS.value)
    t0 = time.perf_counter()
    rows = run(cfg)
    model, _ = get_model("vit", cfg.preset)
    n_base = lj.count_params(nn.meta.unbox(jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, im.IMAGE_SIZE, im.IMAGE_SIZE, 1)))["params"]))
    print(table(rows, n_base))
    print(f"{len(cfg.seeds)} seeds x {len(cfg.held_out)} tasks x {len(METHODS)} methods, "
          f"{cfg.adapt_steps} steps each; total {time.perf_counter() - t0:.0f} s")
    if _OUT.value:
        Path(_OUT.value).write_text(json.dumps(dict(config=dataclasses.asdict(cfg), rows=rows),
                                               indent=1))


if __name__ == "__main__":
    app.run(main)
