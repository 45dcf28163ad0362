"""Benchmark: LoRA vs full fine-tuning, factored vs materialised, merged vs unmerged, side by side.

    python -m experiments.bench                      # GPT-2-small shape, batch 4x128, r=8 on c_attn
    python -m experiments.bench --preset=tiny --steps=3 --out=/tmp/bench.json   # a smoke run

Every mode is jitted, run once to compile, then timed over ``--steps`` calls; the median is
reported. Peak memory is XLA's own accounting of the compiled step (arguments + outputs +
temporaries − donated aliases), which on CPU is deterministic. The matmul rate is a dense fp32
(2048×2048)·(2048×2048) product timed the same way; model FLOP utilisation is the analytic FLOPs of
a step over its time, divided by that rate. Results go to ``--out`` (JSON) and, with
``--markdown``, to the '## LoRA vs full fine-tuning' section of BENCHMARKS.md.
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
from lora_jax.train import make_train_step
from experiments.benchlib import machine, peak_mib, time_fn, write_section
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank (on the fused qkv kernels).")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed calls per mode (after one compile call).")
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## LoRA vs full fine-tuning"






def matmul_flops_per_sec(steps: int) -> float:
    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * 2048**3 / time_fn(f, a, a, steps=steps)


def analytic_flops(cfg, tokens: int, batch: int, seq: int) -> dict:
    """Matmul FLOPs of a forward pass, and of the two kinds of training step."""
    d, L, v = cfg.d_model, cfg.n_layers, cfg.vocab_size
    dense = L * (d * 3 * d + d * d + 2 * d * 4 * d) + d * v  # per token, multiply-adds
    attn = L * 2 * seq * d  # QK^T and AV per token (full, not causal-halved), multiply-adds
    fwd = 2 * tokens * (dense + attn)
    return {"forward": fwd,
            "full": 3 * fwd,  # forward + activation grads + weight grads
            "lora": 2 * fwd}  # forward + activation grads; the frozen base has no weight grads


def run() -> dict:
    model, cfg = get_model("gpt2", _PRESET.value)
    batch, seq = _BATCH.value, _SEQ.value
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, tokens)["params"]))(
        jax.random.key(1))
    spec = lj.LoraSpec(rank=_RANK.value, alpha=2.0 * _RANK.value, targets=("qv",))
    adapters = lj.init_adapters(params, spec, jax.random.key(2),
                                layouts=lj.trace_layouts(model, params, tokens))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B: a real adapter
    tx = optax.adamw(1e-4)

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def make_step(loss):  # lora_jax's one train step, over this bench's loss (no batch, rng)
        return make_train_step(lambda t, f, batch, rng: loss(t, f), tx)

    full_loss = lambda p, _: xent(model.apply({"params": p}, tokens))
    factored_loss = lambda a, p: xent(lj.apply(model, p, a, tokens))
    materialised_loss = lambda a, p: xent(model.apply({"params": lj.merge(p, a)}, tokens))

    steps = _STEPS.value
    results, peaks = {}, {}
    copy = lambda t: jax.tree.map(jnp.copy, t)
    for name, loss, trainable, frozen in [
        ("full_ft", full_loss, params, None),
        ("lora_factored", factored_loss, adapters, params),
        ("lora_materialised", materialised_loss, adapters, params),
    ]:
        step = make_step(loss)
        state = [copy(trainable), tx.init(trainable)]  # donated and replaced at every call
        peaks[name] = peak_mib(step, *state, frozen, None, None)

        def call(step=step, state=state, frozen=frozen):
            state[:] = step(*state, frozen, None, None)[:2]
            return state[0]

        results[name] = time_fn(call, steps=steps)

    merged = jax.jit(lj.merge)(params, adapters)
    infer = jax.jit(lambda p: model.apply({"params": p}, tokens))
    results["base_inference"] = time_fn(infer, params, steps=steps)
    results["merged_inference"] = time_fn(infer, merged, steps=steps)
    results["unmerged_inference"] = time_fn(
        jax.jit(lambda p, a: lj.apply(model, p, a, tokens)), params, adapters, steps=steps)

    rate = matmul_flops_per_sec(steps)
    flops = analytic_flops(cfg, batch * seq, batch, seq)
    ratios = {
        "lora_vs_full_step": results["lora_factored"] / results["full_ft"],
        "materialised_vs_factored_step": results["lora_materialised"] / results["lora_factored"],
        "merged_vs_base_inference": results["merged_inference"] / results["base_inference"],
        "unmerged_vs_base_inference": results["unmerged_inference"] / results["base_inference"],
        "lora_vs_full_peak_memory": peaks["lora_factored"] / peaks["full_ft"],
        "lora_mfu": flops["lora"] / results["lora_factored"] / rate,
        "full_mfu": flops["full"] / results["full_ft"] / rate,
    }
    return {
        "setup": {"preset": _PRESET.value, "batch": batch, "seq": seq, "rank": _RANK.value,
                  "trainable_params": lj.count_params(adapters),
                  "base_params": lj.count_params(params), "steps_timed": steps,
                  "devices": str(jax.devices()[0].platform)},
        "step_ms": {k: 1e3 * v for k, v in results.items()},
        "peak_mib": peaks,
        "matmul_gflops": rate / 1e9,
        "analytic_gflop": {k: v / 1e9 for k, v in flops.items()},
        "ratios": ratios,
    }


def markdown(res: dict, command: str) -> str:
    s, r = res["step_ms"], res["ratios"]
    rows = [
        ("full fine-tuning step", f"{s['full_ft']:.0f} ms", f"{res['peak_mib']['full_ft']:.0f}"),
        ("LoRA step, factored", f"{s['lora_factored']:.0f} ms",
         f"{res['peak_mib']['lora_factored']:.0f}"),
        ("LoRA step, materialised", f"{s['lora_materialised']:.0f} ms",
         f"{res['peak_mib']['lora_materialised']:.0f}"),
        ("base inference", f"{s['base_inference']:.0f} ms", ""),
        ("merged inference", f"{s['merged_inference']:.0f} ms", ""),
        ("unmerged (factored) inference", f"{s['unmerged_inference']:.0f} ms", ""),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    m = res["machine"]
    return (f"{SECTION}\n\n`{command}`\n\n"
            f"{m['cpu']}, {m['cores']} cores; load average {m['load_average_start']:.1f} at the "
            f"start and {m['load_average']:.1f} at the end (the benchmark's own threads count).\n\n"
            f"Setup: {res['setup']}; dense fp32 matmul rate {res['matmul_gflops']:.1f} GFLOP/s.\n\n"
            "| mode | median step | peak MiB (XLA) |\n|---|---|---|\n" + table + "\n\n"
            "| ratio | measured | target |\n|---|---|---|\n"
            f"| LoRA / full step | {r['lora_vs_full_step']:.3f} | ≤ 0.65 |\n"
            f"| LoRA model FLOP utilisation | {r['lora_mfu']:.3f} | ≥ 0.5 |\n"
            f"| merged / base inference | {r['merged_vs_base_inference']:.3f} | ≤ 1.02 |\n"
            f"| unmerged / base inference | {r['unmerged_vs_base_inference']:.3f} | ≤ 1.10 |\n"
            f"| LoRA / full peak memory | {r['lora_vs_full_peak_memory']:.3f} | ≤ 0.5 |\n"
            f"| materialised / factored step | {r['materialised_vs_factored_step']:.3f} | |\n")


def main(argv):
    del argv
    load_start = os.getloadavg()[0]
    res = run()
    res["machine"] = {**machine(), "load_average_start": load_start}
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ratios"], indent=1))
    if _MARKDOWN.value:
        command = " ".join(["python -m experiments.bench"] + sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
