"""Benchmark: the training step of DoRA, MTL-LoRA and the multi-task baselines relative to plain LoRA.

    python -m experiments.bench_mtl --markdown        # GPT-2-small shape, batch 4x128, r=8, c_attn
    python -m experiments.bench_mtl --preset=tiny --steps=3 --out=/tmp/bench_mtl.json   # smoke run

One process, one model, one batch whose 4 rows belong to 4 different tasks (task ids 0..3). Each
method's AdamW step (gradients w.r.t. the adapters only, trainable state donated) is jitted and
run once to compile; then the methods are timed in interleaved rounds (lora, mtl, ..., lora, mtl,
...), so that load from other processes on a shared machine hits all of them alike, and the median
per method is reported. Adapters are made non-zero (B ≠ 0) so no work is skipped. Results go to
``--out`` (JSON) and, with ``--markdown``, to the '## DoRA and MTL-LoRA against LoRA' section of
BENCHMARKS.md, with the machine and its load average at the start and the end.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import lora_jax as lj
from lora_jax.train import make_train_step
from experiments.benchlib import machine, peak_mib, write_section
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size (rows cycle through the tasks).")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 8, "Rank r of every method (on the fused qkv kernels).")
_TASKS = flags.DEFINE_integer("tasks", 4, "Number of tasks T.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed rounds (after one compile call per method).")
_METHODS = flags.DEFINE_list("methods", ["lora", "dora", "mtl", "per_task", "multilora"],
                             "Methods to time; 'lora' is the reference.")
_OUT = flags.DEFINE_string("out", "runs/bench_mtl.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## DoRA and MTL-LoRA against LoRA"
TARGETS = {"dora": ("DoRA", 1.3), "mtl": ("MTL-LoRA", 1.15)}  # issue #19: step / LoRA's
ARGS = {"lora": lambda t: {}, "dora": lambda t: {}, "mtl": lambda t: {"num_tasks": t, "num_up": 3},
        "per_task": lambda t: {"num_tasks": t}, "multilora": lambda t: {"num_loras": 3}}


def run() -> dict:
    model, cfg = get_model("gpt2", _PRESET.value)
    batch, seq, rank, num_tasks = _BATCH.value, _SEQ.value, _RANK.value, _TASKS.value
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    task_ids = jnp.arange(batch, dtype=jnp.int32) % num_tasks
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, tokens)["params"]))(
        jax.random.key(1))
    layouts = lj.trace_layouts(model, params, tokens)
    tx = optax.adamw(1e-4)

    data, key = {"inputs": tokens, "targets": targets, "task_ids": task_ids}, jax.random.key(3)

    def loss(trainable, frozen, batch, rng):
        logits = lj.apply(model, frozen, trainable, batch["inputs"], task_ids=batch["task_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    methods, counts, peaks = {}, {}, {}
    for name in _METHODS.value:
        spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("qv",),
                           method=lj.methods.make(name, **ARGS[name](num_tasks)))
        adapters = lj.init_adapters(params, spec, jax.random.key(2), layouts=layouts)
        adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B: a real adapter
        step = make_train_step(loss, tx)
        opt_state = tx.init(adapters)
        peaks[name] = peak_mib(step, adapters, opt_state, params, data, key)
        counts[name] = lj.count_params(adapters)
        state = list(step(adapters, opt_state, params, data, key))  # compile + one warm-up step
        jax.block_until_ready(state)
        methods[name] = (step, state)

    times = {name: [] for name in methods}
    for _ in range(_STEPS.value):
        for name, (step, state) in methods.items():
            t0 = time.perf_counter()
            state[0], state[1], _ = step(state[0], state[1], params, data, key)
            jax.block_until_ready(state[0])
            times[name].append(time.perf_counter() - t0)
    step_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "setup": {"preset": _PRESET.value, "batch": batch, "seq": seq, "rank": rank,
                  "tasks": num_tasks, "task_ids": task_ids.tolist(), "targets": "c_attn",
                  "steps_timed": _STEPS.value, "devices": str(jax.devices()[0].platform),
                  "base_params": lj.count_params(params)},
        "trainable_params": counts,
        "step_ms": step_ms,
        "all_ms": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
        "peak_mib": peaks,
        "vs_lora": {k: v / step_ms["lora"] for k, v in step_ms.items()},
    }


def markdown(res: dict, command: str) -> str:
    what = {"lora": "LoRA (reference)", "dora": "DoRA (magnitude × direction)", "mtl": "MTL-LoRA, n=3 up-projections, full Λ_t",
            "per_task": "one LoRA per task (routed)", "multilora": "MultiLoRA, n=3 summed LoRAs"}
    rows = "\n".join(
        f"| {what[k]} | {res['trainable_params'][k]:,} | {v:.0f} ms | "
        f"{min(res['all_ms'][k]):.0f}–{max(res['all_ms'][k]):.0f} ms | "
        f"{res['vs_lora'][k]:.3f} | {res['peak_mib'][k]:.0f} |"
        for k, v in res["step_ms"].items())
    verdict = "".join(
        f"{name} / LoRA step time: **{res['vs_lora'][k]:.3f}** "
        f"(target ≤ {t}: {'met' if res['vs_lora'][k] <= t else 'NOT met'}).\n"
        for k, (name, t) in TARGETS.items() if k in res["vs_lora"])
    m = res["machine"]
    return (f"{SECTION}\n\n`{command}`\n\n"
            f"{m['cpu']}, {m['cores']} cores; load average {m['load_average_start']:.1f} at the "
            f"start and {m['load_average']:.1f} at the end.\n\n"
            f"Setup: {res['setup']}. Medians of interleaved rounds after compiling; every "
            "step is AdamW on the adapters with the base frozen; one batch mixes all tasks.\n\n"
            + verdict + "\n" +
            "| method | trainable | median step | range | / LoRA | peak MiB (XLA) |\n"
            "|---|---|---|---|---|---|\n" + rows + "\n")


def main(argv):
    del argv
    if "lora" not in _METHODS.value:
        raise app.UsageError("--methods must include 'lora', the reference")
    load_start = os.getloadavg()[0]
    res = run()
    res["machine"] = {**machine(), "load_average_start": load_start}
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps({"step_ms": res["step_ms"], "vs_lora": res["vs_lora"]}, indent=1))
    if _MARKDOWN.value:
        command = " ".join(["python -m experiments.bench_mtl"] + sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
