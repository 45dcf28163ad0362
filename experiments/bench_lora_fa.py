"""Benchmark: peak memory of one LoRA-FA train step against LoRA's, on the GPT-2-small shape.

    python -m experiments.bench_lora_fa                          # GPT-2 small, batch 4x256, r=8
    python -m experiments.bench_lora_fa --preset=tiny --out=/tmp/bfa.json   # a smoke run

XLA's accounting of the compiled step (``lora_jax.train.make_train_step``: loss, gradients w.r.t.
the adapters only, AdamW; bf16 base and compute, adapters on every linear layer), from abstract
shapes only: nothing is run or allocated. LoRA must keep each adapted layer's input ``x`` for A's
gradient; LoRA-FA (A frozen) keeps only ``x·A`` for B's. Reported: temporaries (the activations
kept for the backward pass and the scratch), and the peak (arguments + outputs + temporaries −
donated aliases), in MiB, with the trainable parameter count and optimizer-state size.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import lora_jax as lj
from experiments.benchlib import peak_mib
from lora_jax.models import get_model
from lora_jax.train import make_train_step, token_loss

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 8, "Adapter rank.")
_TARGETS = flags.DEFINE_string("targets", "all-linear", "Adapter targets.")
_OUT = flags.DEFINE_string("out", "bench_lora_fa.json", "Where to write the JSON results.")

MIB = 2**20
METHODS = ("lora", "lora_fa")


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def measure(method: str, preset: str, batch: int, seq: int, rank: int, targets: str) -> dict:
    """Compiled memory of one train step for ``method``; nothing is allocated."""
    model, cfg = get_model("gpt2", preset, dtype=jnp.bfloat16)
    example = jnp.zeros((1, seq), jnp.int32)
    params = jax.eval_shape(lambda: jax.tree.map(
        lambda x: x.astype(jnp.bfloat16),
        lj.transform._unbox(model.init(jax.random.key(0), example)["params"])))
    layouts = lj.trace_layouts(model, params, example)
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=(targets,), method=method)
    adapters = jax.eval_shape(lambda p: lj.init_adapters(p, spec, jax.random.key(1),
                                                         layouts=layouts), params)
    trainable, state = lj.split(adapters)
    tx = lj.adapter_optimizer(optax.adamw(1e-4), trainable)
    opt_state = jax.eval_shape(tx.init, trainable)

    def loss_fn(t, f, b, rng):
        logits = lj.apply(model, f["params"], lj.join(t, f["state"]), b["inputs"])
        return token_loss(logits, b)[0]

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    b = {"inputs": tokens, "targets": tokens, "loss_mask": jax.ShapeDtypeStruct((batch, seq),
                                                                                 jnp.float32)}
    step = make_train_step(loss_fn, tx)
    args = (trainable, opt_state, {"params": params, "state": state}, b,
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    m = step.lower(*args).compile().memory_analysis()
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    return {"temp_mib": m.temp_size_in_bytes / MIB, "peak_mib": peak_mib(step, *args),
            "trainable": n_train,
            "opt_state_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
            / MIB}


def markdown(res: dict, command: str) -> str:
    lines = [f"GPT-2 `{res['preset']}` shape, batch {res['batch']}×{res['seq']}, rank "
             f"{res['rank']} on `{res['targets']}`, bf16, on `{res['device']}`; `{command}`.", "",
             "| method | trainable | optimizer state (MiB) | temporaries (MiB) | peak (MiB) |",
             "|---|---|---|---|---|"]
    for name in METHODS:
        r = res[name]
        lines.append(f"| {name} | {r['trainable']:,} | {r['opt_state_mib']:.1f} | "
                     f"{r['temp_mib']:.1f} | {r['peak_mib']:.1f} |")
    fa, lo = res["lora_fa"], res["lora"]
    lines.append(f"\nLoRA-FA / LoRA: temporaries {fa['temp_mib'] / lo['temp_mib']:.3f}, peak "
                 f"{fa['peak_mib'] / lo['peak_mib']:.3f}.")
    return "\n".join(lines)


def main(argv):
    del argv
    res = {"preset": _PRESET.value, "batch": _BATCH.value, "seq": _SEQ.value,
           "rank": _RANK.value, "targets": _TARGETS.value,
           "device": jax.devices()[0].device_kind}
    for name in METHODS:
        res[name] = measure(name, _PRESET.value, _BATCH.value, _SEQ.value, _RANK.value,
                            _TARGETS.value)
        print(name, res[name], flush=True)
    res["load_average"] = os.getloadavg()[0]
    print(markdown(res, " ".join(["python -m experiments.bench_lora_fa", *sys.argv[1:]])))
    print(f"load average {res['load_average']:.1f} (XLA's accounting: exact, not timed)")
    Path(_OUT.value).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    app.run(main)
