"""Benchmark: a batch mixing 8 adapters (a bank) against one adapter for all, and decoding speed.

    python -m experiments.bench_multi --markdown        # GPT-2-small, 8 adapters r=8 all-linear
    python -m experiments.bench_multi --preset=tiny --rounds=2 --out=/tmp/bench_multi.json  # smoke

One process, one GPT-2 model, batch 8, eight LoRA adapters of rank 8 on every linear kernel (B ≠ 0
so no work is skipped). Timed, each jitted and run once to compile first, then in interleaved
rounds (every variant once per round, so load from other processes hits all alike), medians and
ranges reported:

- forward over the batch (batch × seq tokens) and one KV-cached decode step (batch × 1 token) for:
  the bank with 8 distinct ids (the mixed batch), the bank with one id for all, one plain LoRA
  (``lj.apply`` with one adapter tree), and a loop over the adapters at the model level (one call
  per adapter on its own row: what a library without banks does; PEFT loops inside each layer);
- decode tokens/s (batch / step time) for the base, the merged model, the factored LoRA and the
  mixed bank.
Results go to ``--out`` (JSON) and, with ``--markdown``, to the '## Adapter banks' section of
BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

import lora_jax as lj
from experiments.benchlib import write_section
from lora_jax.generate import decode_step, init_cache, prefill
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size = number of distinct adapters.")
_SEQ = flags.DEFINE_integer("seq", 16, "Prompt length (forward) = filled cache slots (decode).")
_RANK = flags.DEFINE_integer("rank", 8, "Rank of every adapter.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed interleaved rounds (after compiling).")
_REPEATS = flags.DEFINE_integer("decode_repeats", 3, "Decode-step samples per round (cheap).")
_OUT = flags.DEFINE_string("out", "runs/bench_multi.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## Adapter banks"


def _adapters(params, layouts, n, rank):
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=("all-linear",))
    out = []
    for i in range(n):
        a = lj.init_adapters(params, spec, jax.random.key(100 + i), layouts=layouts)
        out.append(jax.tree.map(lambda x: x + 0.01 * (i + 1), a))  # B ≠ 0
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run() -> dict:
    model, cfg = get_model("gpt2", _PRESET.value)
    batch, seq, rank = _BATCH.value, _SEQ.value, _RANK.value
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, tokens)["params"]))(
        jax.random.key(1))
    layouts = lj.trace_layouts(model, params, tokens)
    adapters = _adapters(params, layouts, batch, rank)
    bank = lj.stack_adapters({f"a{i}": a for i, a in enumerate(adapters)})
    merged = jax.jit(lj.merge)(params, adapters[0])
    mixed_ids = jnp.arange(batch, dtype=jnp.int32)
    same_ids = jnp.zeros(batch, jnp.int32)
    fwd = jax.jit(lambda p, a, x, ids: lj.apply(model, p, a, x, adapter_ids=ids))

    # Decode state: a cache with `seq` slots filled, one more slot to write.
    mask = jnp.ones((batch, seq), bool)
    cache = init_cache(model, batch, seq + 1)
    _, cache, kv_mask, pos = prefill(model, params, adapters[0], tokens, mask, cache)
    tok, slot = tokens[:, -1], jnp.int32(seq)
    rows = [jax.tree.map(lambda c: c[:, i: i + 1], cache) for i in range(batch)]

    def step(p, a, ids=None, c=cache, t=tok, ps=pos, m=kv_mask):
        return decode_step(model, p, a, t, ps, slot, m, c, ids)

    variants = {
        "forward: bank, 8 distinct adapters": lambda: fwd(params, bank, tokens, mixed_ids),
        "forward: bank, one adapter for all": lambda: fwd(params, bank, tokens, same_ids),
        "forward: one LoRA (plain)": lambda: fwd(params, adapters[0], tokens, None),
        "forward: loop over 8 adapters": lambda: [
            fwd(params, a, tokens[i: i + 1], None) for i, a in enumerate(adapters)],
        "decode step: base": lambda: step(params, {}),
        "decode step: merged": lambda: step(merged, {}),
        "decode step: one LoRA, factored": lambda: step(params, adapters[0]),
        "decode step: bank, 8 distinct adapters": lambda: step(params, bank, mixed_ids),
        "decode step: bank, one adapter for all": lambda: step(params, bank, same_ids),
        "decode step: loop over 8 adapters": lambda: [
            step(params, a, None, rows[i], tok[i: i + 1], pos[i: i + 1], kv_mask[i: i + 1])
            for i, a in enumerate(adapters)],
    }
    for fn in variants.values():  # compile
        jax.block_until_ready(fn())
    times = {k: [] for k in variants}
    forward = {k: f for k, f in variants.items() if k.startswith("forward")}
    decode = {k: f for k, f in variants.items() if k.startswith("decode")}
    for _ in range(_ROUNDS.value):
        for k, fn in forward.items():
            times[k].append(_timed(fn))
        for _ in range(_REPEATS.value):
            for k, fn in decode.items():
                times[k].append(_timed(fn))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratio = {
        "forward mixed / one for all (bank)": ms["forward: bank, 8 distinct adapters"]
        / ms["forward: bank, one adapter for all"],
        "forward mixed / plain LoRA": ms["forward: bank, 8 distinct adapters"]
        / ms["forward: one LoRA (plain)"],
        "decode mixed / one for all (bank)": ms["decode step: bank, 8 distinct adapters"]
        / ms["decode step: bank, one adapter for all"],
        "decode mixed / plain LoRA": ms["decode step: bank, 8 distinct adapters"]
        / ms["decode step: one LoRA, factored"],
        "forward loop / mixed": ms["forward: loop over 8 adapters"]
        / ms["forward: bank, 8 distinct adapters"],
        "decode loop / mixed": ms["decode step: loop over 8 adapters"]
        / ms["decode step: bank, 8 distinct adapters"],
    }
    tps = {k.split(": ", 1)[1]: 1e3 * batch / v for k, v in ms.items()
           if k.startswith("decode step") and "loop" not in k}
    return {
        "setup": {"preset": _PRESET.value, "batch": batch, "seq": seq, "rank": rank,
                  "adapters": batch, "targets": "all-linear", "rounds": _ROUNDS.value,
                  "decode_repeats": _REPEATS.value,
                  "devices": str(jax.devices()[0].platform),
                  "base_params": lj.count_params(params)},
        "median_ms": ms,
        "all_ms": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
        "ratios": ratio,
        "decode_tokens_per_s": tps,
    }


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load average (1, 5, 15 min) {load}"


def markdown(res: dict, command: str, machine: str) -> str:
    rows = "\n".join(
        f"| {k} | {v:.1f} ms | {min(res['all_ms'][k]):.1f}–{max(res['all_ms'][k]):.1f} ms |"
        for k, v in res["median_ms"].items())
    ratios = "\n".join(f"| {k} | {v:.2f} |" for k, v in res["ratios"].items())
    tps = ", ".join(f"{k}: {v:.0f}" for k, v in res["decode_tokens_per_s"].items())
    r = res["ratios"]["decode mixed / one for all (bank)"]
    f = res["ratios"]["forward mixed / one for all (bank)"]
    pf = res["ratios"]["forward mixed / plain LoRA"]
    pr = res["ratios"]["decode mixed / plain LoRA"]
    verdict = (f"Mixed / one adapter for all through the bank (target ≤ 1.2×): forward "
               f"**{f:.2f}×**, decode step **{r:.2f}×** "
               f"({'met' if max(f, r) <= 1.2 else 'NOT met'})."
               f" Against one plain LoRA (no bank): forward **{pf:.2f}×**, decode step "
               f"**{pr:.2f}×** ({'met' if max(pf, pr) <= 1.2 else 'NOT met'}).")
    return (f"{SECTION}\n\n`{command}`\n\nMachine: {machine} (at the end of the run; the machine "
            "is shared with other engineers' jobs, so absolute times are noisy).\n\n"
            f"Setup: {res['setup']}. Medians of interleaved rounds after compiling.\n\n"
            f"{verdict}\n\n| variant | median | range |\n|---|---|---|\n{rows}\n\n"
            f"| ratio | value |\n|---|---|\n{ratios}\n\nDecode tokens/s (batch / step): {tps}.\n\n"
            "Reading it: 'bank, one adapter for all' runs the same per-example gathers as the "
            "mixed "
            "batch, so mixed / one-for-all isolates the cost of mixing (none by construction: the "
            "work does not depend on the ids); mixed / plain LoRA adds the bank path's own cost, "
            "the per-layer gather of each example's rank-r factors (batch copies of A and B). The "
            "loop rows call the model once per adapter on its own row (a model-level loop; PEFT "
            "loops inside each layer and runs the base once). Round-to-round ranges on this "
            "shared CPU are wide; ratios within the ranges' overlap are not resolved.\n")


def main(argv):
    del argv
    res = run()
    res["machine"] = _machine()
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("median_ms", "ratios", "decode_tokens_per_s",
                                          "machine")}, indent=1))
    if _MARKDOWN.value:
        command = " ".join(["python -m experiments.bench_multi"] + sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command, res["machine"]))


if __name__ == "__main__":
    app.run(main)
