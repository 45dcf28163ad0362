"""Benchmark: ViT-B/16 training step, LoRA against full fine-tuning, side by side.

    python -m experiments.bench_vit --markdown                    # batch 32 of 224² images
    python -m experiments.bench_vit --time_batch=4 --markdown     # what a loaded 2-core CPU allows
    python -m experiments.bench_vit --preset=tiny --steps=2 --out=/tmp/bench_vit.json  # smoke run

The model is the `vit-b/16` preset (86.6M parameters, 1000 classes, scanned blocks). LoRA is
PEFT's ViT recipe: rank 8 on the query and value projections (`qv`), the classification head
trained as a module to save; full fine-tuning trains every parameter. Both steps are AdamW, jitted
with the trainable state donated. Peak memory is XLA's accounting of the compiled step at
`--memory_batch` (compile only, deterministic on CPU); step time is measured at `--time_batch`
in interleaved rounds (lora, full, lora, full, ...) after one compile call each, and the medians
are reported with their range. Results go to `--out` (JSON) and, with `--markdown`, to the
'## ViT-B/16: LoRA vs full fine-tuning' section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import lora_jax as lj
from lora_jax.train import make_train_step
from experiments.benchlib import peak_mib, write_section
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "vit-b/16", "ViT preset (lora_jax.models.vit_config).")
_TIME_BATCH = flags.DEFINE_integer("time_batch", 32, "Batch size of the timed steps.")
_MEMORY_BATCH = flags.DEFINE_integer("memory_batch", 32, "Batch size of the peak-memory figure.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank on the query and value projections.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed rounds (after one compile call per mode).")
_OUT = flags.DEFINE_string("out", "runs/bench_vit.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## ViT-B/16: LoRA vs full fine-tuning"
MODES = ("lora", "full")


def _batch(cfg, batch: int):
    key = jax.random.key(0)
    images = jax.random.uniform(key, (batch, cfg.image_size, cfg.image_size, cfg.channels))
    labels = jax.random.randint(key, (batch,), 0, cfg.num_classes)
    return images, labels


def build(model, cfg, rank: int):
    """Returns `{mode: (jitted step, trainable, opt_state, frozen)}` and the base params."""
    images, _ = _batch(cfg, 1)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, images)["params"]))(jax.random.key(1))
    layouts = lj.trace_layouts(model, params, images)
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("qv",),
                       modules_to_save=(r"head/(kernel|bias)",))
    adapters = lj.init_adapters(params, spec, jax.random.key(2), layouts=layouts)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B: no work is skipped

    def make(forward, tx):
        def loss(trainable, frozen, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(forward(trainable, frozen, x),
                                                                   y).mean()

        # lora_jax's one train step; the batch is (images, labels), no rng
        return make_train_step(lambda t, f, batch, rng: loss(t, f, *batch), tx)

    full_tx = optax.adamw(1e-4)
    lora_tx = lj.adapter_optimizer(optax.adamw(1e-4), adapters)
    modes = {
        "lora": (make(lambda t, f, x: lj.apply(model, f, t, x), lora_tx), adapters,
                 lora_tx.init(adapters), params),
        # Full fine-tuning's trainable tree is a copy, so donating it leaves `params` intact.
        "full": (make(lambda t, _, x: model.apply({"params": t}, x), full_tx),
                 jax.tree.map(jnp.copy, params), full_tx.init(params), None),
    }
    return modes, params


def run() -> dict:
    model, cfg = get_model("vit", _PRESET.value, scan_layers=True)
    modes, params = build(model, cfg, _RANK.value)
    trainable_lora = lj.count_params(lj.split(modes["lora"][1])[0])  # before donation
    peaks = {m: peak_mib(step, t, o, f, _batch(cfg, _MEMORY_BATCH.value), None)
             for m, (step, t, o, f) in modes.items()}
    x, y = _batch(cfg, _TIME_BATCH.value)
    state, compile_s = {}, {}
    for m, (step, t, o, f) in modes.items():
        t0 = time.perf_counter()
        state[m] = list(step(t, o, f, (x, y), None)[:2])  # compile + one warm-up step
        jax.block_until_ready(state[m])
        compile_s[m] = time.perf_counter() - t0
    times = {m: [] for m in modes}
    for _ in range(_STEPS.value):
        for m, (step, _, _, f) in modes.items():
            t0 = time.perf_counter()
            state[m] = list(step(state[m][0], state[m][1], f, (x, y), None)[:2])
            jax.block_until_ready(state[m][0])
            times[m].append(time.perf_counter() - t0)
    step_s = {m: statistics.median(v) for m, v in times.items()}
    return {
        "setup": {"preset": _PRESET.value, "time_batch": _TIME_BATCH.value,
                  "memory_batch": _MEMORY_BATCH.value, "rank": _RANK.value,
                  "image_size": cfg.image_size, "steps_timed": _STEPS.value,
                  "devices": str(jax.devices()[0].platform), "base_params": lj.count_params(params),
                  "trainable_lora": trainable_lora},
        "step_s": step_s,
        "all_s": {m: [round(t, 2) for t in v] for m, v in times.items()},
        "first_call_s": compile_s,
        "peak_mib": peaks,
        "lora_over_full": {"step": step_s["lora"] / step_s["full"],
                           "peak": peaks["lora"] / peaks["full"]},
    }


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def markdown(res: dict, command: str) -> str:
    s = res["setup"]
    rows = "\n".join(
        f"| {'LoRA r=%d on qv + head' % s['rank'] if m == 'lora' else 'full fine-tuning'} | "
        f"{s['trainable_lora'] if m == 'lora' else s['base_params']:,} | "
        f"{res['step_s'][m]:.2f} s | {min(res['all_s'][m]):.2f}–{max(res['all_s'][m]):.2f} s | "
        f"{res['peak_mib'][m]:,.0f} |" for m in MODES)
    return (f"{SECTION}\n\n`{command}`\n\n"
            f"Setup: {s}. Machine: {_machine()}.\n\n"
            f"| mode | trainable | median step (batch {s['time_batch']}) | range | "
            f"peak MiB (XLA, batch {s['memory_batch']}) |\n|---|---|---|---|---|\n{rows}\n\n"
            f"LoRA / full: step time **{res['lora_over_full']['step']:.3f}**, peak memory "
            f"**{res['lora_over_full']['peak']:.3f}**.\n")


def main(argv):
    del argv
    res = run()
    res["machine"] = _machine()
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("step_s", "peak_mib", "lora_over_full", "machine")},
                     indent=1))
    if _MARKDOWN.value:
        command = " ".join(["python -m experiments.bench_vit"] + sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
