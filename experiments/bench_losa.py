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
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app

import lora_jax as lj
from experiments import bench
from lora_jax.models import get_model
from lora_jax.sparsity import model as sm

SECTION = "## LoSA"
FLAGS = bench.flags.FLAGS


def _steps(model, params, tokens):
    """``{name: (jitted step, args)}`` for full FT, LoRA, LoSA and LoSA without remat."""
    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    def make(loss, tx):
        def step(trainable, opt_state, frozen):
            l, g = jax.value_and_grad(loss)(trainable, frozen)
            u, opt_state = tx.update(g, opt_state, trainable)
            return optax.apply_updates(trainable, u), opt_state, l
        return jax.jit(step, donate_argnums=(0, 1))

    out = {}
    tx = optax.adamw(1e-4)
    full = make(lambda p, f: xent(model.apply({"params": p}, tokens)), tx)
    own = jax.tree.map(jnp.copy, params)  # donated by the step
    out["full fine-tuning"] = (full, (own, tx.init(own), {}))
    layouts = lj.trace_layouts(model, params, tokens[:1])
    rank = FLAGS.rank
    sparse, _ = sm.prune_model(model, params, tokens, 0.5, "magnitude")
    for name, method, base, opts in (("lora", "lora", params, ()),
                                     ("losa", "losa", sparse, ()),
                                     ("losa (no remat)", "losa", sparse, (("remat", False),))):
        spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("all-linear",), method=method,
                           options=opts)
        adapters = lj.init_adapters(base, spec, jax.random.key(1), layouts=layouts)
        if opts:
            adapters = jax.tree.map(lambda a: dataclasses.replace(a, options=opts), adapters,
                                    is_leaf=lj.methods.is_adapter)
        trainable, state = lj.split(adapters)
        atx = lj.adapter_optimizer(tx, trainable)
        step = make(lambda t, f: xent(lj.apply(model, f["params"], lj.join(t, f["state"]),
                                                tokens)), atx)
        out[name] = (step, (trainable, atx.init(trainable), {"params": base, "state": state}))
    return out


def _time_step(step, args, steps):
    trainable, opt_state, frozen = args
    mib = bench.peak_mib(step, trainable, opt_state, frozen)
    trainable, opt_state, _ = jax.block_until_ready(step(trainable, opt_state, frozen))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainable, opt_state, _ = jax.block_until_ready(step(trainable, opt_state, frozen))
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
    res = run()
    Path(FLAGS.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ratios"], indent=1))
    if FLAGS.markdown:
        command = " ".join(["python -m experiments.bench_losa"] + sys.argv[1:])
        bench.write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
