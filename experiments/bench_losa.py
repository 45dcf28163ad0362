"""Benchmark: LoSA's sparse-adapter step against LoRA and full fine-tuning, and pruning time.

    python -m experiments.bench_losa --markdown --out=bench_losa.json   # GPT-2 small, 4x128
    python -m experiments.bench_losa --preset=tiny --steps=2 --out=/tmp/b.json  # a smoke run

Shares ``experiments.bench``'s flags (``--preset --batch --seq --rank --steps --out
--markdown``) and its timing: each step is jitted, called once to compile, then timed over
``--steps`` calls (median); memory is XLA's accounting of the compiled step. All linear kernels
of every block are adapted (rank ``--rank``); the LoSA base is pruned to 50% (magnitude, so
setup is quick; the step does not depend on which pruner made the mask). ``losa (no remat)``
is the same step without ``jax.checkpoint`` around the masked product. Pruning time is per
transformer block (its four kernels, calibration statistics included) on 4x128 calibration
tokens, after a compile call. ``--markdown`` rewrites the '## LoSA' section of BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app

import lora_jax as lj
from lora_jax.train import make_train_step
from experiments import bench
from experiments.benchlib import machine
from lora_jax.models import get_model
from lora_jax.sparsity import model as sm

SECTION = "## LoSA"
PRUNE_SECTION = "## Pruning time"
FLAGS = bench.flags.FLAGS
_PRUNE_ONLY = bench.flags.DEFINE_bool("prune_only", False, "Only time the pruners (GPT-2 block "
                                      "and a Llama-7B-shaped layer); writes '## Pruning time'.")
_LLAMA_PRUNERS = bench.flags.DEFINE_list("llama_pruners", ["magnitude", "wanda", "sparsegpt"],
                                         "Pruners timed on the Llama-7B-shaped layer.")
# One Llama-7B decoder layer: (d_in, d_out) of its seven linear kernels; 32 such layers.
LLAMA7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                 "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
                 "down_proj": (11008, 4096)}
LLAMA7B_LAYERS = 32


def _steps(model, params, tokens):
    """``{name: (jitted step, args)}`` for full FT, LoRA, LoSA and LoSA without remat."""
    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    def make(loss, tx):  # lora_jax's one train step over this bench's loss (no batch, rng)
        return make_train_step(lambda t, f, batch, rng: loss(t, f), tx)

    out = {}
    tx = optax.adamw(1e-4)
    full = make(lambda p, f: xent(model.apply({"params": p}, tokens)), tx)
    own = jax.tree.map(jnp.copy, params)  # donated by the step
    out["full fine-tuning"] = (full, (own, tx.init(own), {}))
    layouts = lj.trace_layouts(model, params, tokens[:1])
    rank = FLAGS.rank
    sparse, _ = sm.prune_model(model, params, tokens, 0.5, "magnitude")
    for name, method, base in (("lora", lj.methods.lora(), params),
                               ("losa", lj.methods.losa(), sparse),
                               ("losa (no remat)", lj.methods.losa(remat=False), sparse)):
        spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("all-linear",), method=method)
        adapters = lj.init_adapters(base, spec, jax.random.key(1), layouts=layouts)
        trainable, state = lj.split(adapters)
        atx = lj.adapter_optimizer(tx, trainable)
        step = make(lambda t, f: xent(lj.apply(model, f["params"], lj.join(t, f["state"]),
                                                tokens)), atx)
        out[name] = (step, (trainable, atx.init(trainable), {"params": base, "state": state}))
    return out


def _time_step(step, args, steps):
    trainable, opt_state, frozen = args
    mib = bench.peak_mib(step, trainable, opt_state, frozen, None, None)
    trainable, opt_state, _ = jax.block_until_ready(step(trainable, opt_state, frozen, None, None))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainable, opt_state, _ = jax.block_until_ready(
            step(trainable, opt_state, frozen, None, None))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mib


def _prune_times(model, params, tokens, steps):
    """Seconds per block (4 kernels, stats included) for each pruner: first call and warm."""
    blocks, x0 = sm.capture_blocks(model, params, tokens)
    layouts = lj.trace_layouts(model, params, tokens[:1])
    paths = [t.path for t in lj.select_targets(params, ("all-linear",), rank=1, alpha=1.0)
             if t.path.startswith(blocks.names[0] + "/")]
    one = {blocks.names[0]: params[blocks.names[0]]}
    one_blocks = dataclasses.replace(blocks, names=blocks.names[:1])
    out = {}
    for pruner in sm.PRUNERS:
        times = []
        for _ in range(1 + max(steps // 2, 1)):
            t0 = time.perf_counter()
            p, _, _ = sm.prune_blocks(one_blocks, one, x0, paths, layouts, [0.5], pruner)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - t0)
        out[pruner] = {"first_s": times[0], "warm_s": statistics.median(times[1:])}
    shapes = {p.split("/", 1)[1]: list(layouts[p].kernel_shape) for p in paths}
    return out, shapes


def _llama_layer_prune_times(pruners: list[str], rows: int = 512) -> dict:
    """Seconds to prune one Llama-7B-shaped layer (7 kernels, random weights, ``rows`` random
    calibration rows, statistics included) with each pruner, one call per kernel: the first
    kernel of each shape pays the compile, as the first layer of a real run would."""
    from lora_jax.sparsity import pruners as pr
    out = {}
    for pruner in pruners:
        per_kernel = {}
        for i, (name, (d_in, d_out)) in enumerate(LLAMA7B_LAYER.items()):
            kw, kx = jax.random.split(jax.random.key(i))
            w = 0.02 * jax.random.normal(kw, (d_in, d_out), jnp.float32)
            x = jax.random.normal(kx, (rows, d_in), jnp.float32)
            jax.block_until_ready((w, x))
            t0 = time.perf_counter()
            stats = pr.calib_stats_from_inputs(x) if pruner != "magnitude" else None
            w2, keep = sm.prune_kernel(w, stats, 0.5, pruner)
            jax.block_until_ready((w2, keep))
            per_kernel[name] = time.perf_counter() - t0
            print(f"llama {pruner} {name}: {per_kernel[name]:.2f} s", flush=True)
            del w, x, w2, keep, stats
        layer = sum(per_kernel.values())
        out[pruner] = {"per_kernel_s": per_kernel, "layer_s": layer,
                       "model_s_projected": layer * LLAMA7B_LAYERS}
    return out


def prune_markdown(res: dict, command: str) -> str:
    m = res["machine"]
    rows = "\n".join(f"| {n} | {v['first_s']:.2f} | {v['warm_s']:.2f} |"
                      for n, v in res["prune_per_block"].items())
    kernels = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in res["block_kernels"].items())
    llama = "\n".join(
        f"| {n} | {v['layer_s']:.1f} | {v['model_s_projected'] / 60:.1f} | "
        + ", ".join(f"{k} {t:.1f}" for k, t in v["per_kernel_s"].items()) + " |"
        for n, v in res.get("llama_layer", {}).items())
    return (f"{PRUNE_SECTION}\n\n`{command}`\n\n"
            f"{res['device']} ({m['cpu']}, {m['cores']} cores), load average "
            f"{m['load_average_start']:.1f} at the start and {m['load_average']:.1f} at the end "
            "of the run (the machine is shared; figures scale with that load). Masks come from a "
            "32-step binary search on order-preserving integer keys (no sort), equal to the "
            "earlier double-argsort masks (tests/sparsity/test_pruner_masks.py).\n\n"
            f"One GPT-2 `{res['preset']}` block ({kernels}; {res['batch']}x{res['seq']} "
            "calibration tokens, statistics and the block's forward passes included), 50%:\n\n"
            "| pruner | first call s (compile included) | warm s |\n|---|---:|---:|\n"
            + rows + "\n\n"
            "One Llama-7B-shaped layer (q/k/v/o 4096x4096, gate/up 4096x11008, down 11008x4096; "
            "random weights, 512 random calibration rows, statistics included; one call per "
            "kernel, "
            "so the first kernel of each shape pays its compile), 50%, projected to 32 layers:"
            "\n\n| pruner | layer s | 32 layers, min | per kernel s |\n|---|---:|---:|---|\n"
            + llama + "\n")


def run_prune_only() -> dict:
    """Pruning times only: a GPT-2 block and the Llama-7B-shaped layer."""
    load_start = os.getloadavg()[0]
    model, cfg = get_model("gpt2", FLAGS.preset)
    tokens = jax.random.randint(jax.random.key(0), (FLAGS.batch, FLAGS.seq), 0, cfg.vocab_size)
    params = lj.transform._unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    res = {"preset": FLAGS.preset, "batch": FLAGS.batch, "seq": FLAGS.seq,
           "device": jax.devices()[0].device_kind}
    res["prune_per_block"], res["block_kernels"] = _prune_times(model, params, tokens,
                                                                FLAGS.steps)
    print(json.dumps(res["prune_per_block"]), flush=True)
    del params
    res["llama_layer"] = _llama_layer_prune_times(_LLAMA_PRUNERS.value)
    res["machine"] = {**machine(), "load_average_start": load_start}
    return res


def run() -> dict:
    model, cfg = get_model("gpt2", FLAGS.preset)
    tokens = jax.random.randint(jax.random.key(0), (FLAGS.batch, FLAGS.seq), 0, cfg.vocab_size)
    params = lj.transform._unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    res = {"preset": FLAGS.preset, "batch": FLAGS.batch, "seq": FLAGS.seq, "rank": FLAGS.rank,
           "device": jax.devices()[0].device_kind, "steps": {}}
    for name, (step, args) in _steps(model, params, tokens).items():
        sec, mib = _time_step(step, args, FLAGS.steps)
        res["steps"][name] = {"step_s": sec, "peak_mib": mib}
        print(f"{name}: {sec:.3f} s/step, {mib:.0f} MiB", flush=True)
    s = res["steps"]
    res["ratios"] = {"losa / lora": s["losa"]["step_s"] / s["lora"]["step_s"],
                     "losa / full": s["losa"]["step_s"] / s["full fine-tuning"]["step_s"],
                     "losa no-remat / losa": s["losa (no remat)"]["step_s"] / s["losa"]["step_s"]}
    res["prune_per_block"], res["block_kernels"] = _prune_times(model, params, tokens,
                                                                FLAGS.steps)
    return res


def markdown(res: dict, command: str) -> str:
    rows = "\n".join(f"| {n} | {v['step_s'] * 1e3:,.0f} | {v['peak_mib']:,.0f} |"
                     for n, v in res["steps"].items())
    prune = "\n".join(f"| {n} | {v['first_s']:.2f} | {v['warm_s']:.2f} |"
                      for n, v in res["prune_per_block"].items())
    r = res["ratios"]
    kernels = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in res["block_kernels"].items())
    return (f"{SECTION}\n\n`{command}`\n\n"
            f"GPT-2 `{res['preset']}`, batch {res['batch']}x{res['seq']}, rank {res['rank']} on "
            f"every linear kernel, LoSA base at 50% sparsity, {res['device']}; medians after "
            "compile.\n\n"
            "| step | ms/step | peak MiB |\n|---|---:|---:|\n" + rows + "\n\n"
            f"LoSA / LoRA = {r['losa / lora']:.2f}x, LoSA / full fine-tuning = "
            f"{r['losa / full']:.2f}x, LoSA without remat / with = "
            f"{r['losa no-remat / losa']:.2f}x.\n\n"
            f"Pruning one block ({kernels}; 4x128 calibration tokens, statistics included):\n\n"
            "| pruner | first call s | warm s |\n|---|---:|---:|\n" + prune + "\n")


def main(argv):
    del argv
    if _PRUNE_ONLY.value:
        res = run_prune_only()
        Path(FLAGS.out).write_text(json.dumps(res, indent=1))
        if FLAGS.markdown:
            command = " ".join(["python -m experiments.bench_losa"] + sys.argv[1:])
            bench.write_section(Path("BENCHMARKS.md"), prune_markdown(res, command))
        return
    res = run()
    Path(FLAGS.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ratios"], indent=1))
    if FLAGS.markdown:
        command = " ".join(["python -m experiments.bench_losa"] + sys.argv[1:])
        bench.write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
