"""Benchmark: QLoRA's memory and speed on the GPT-2-small-shaped model.

    python -m experiments.bench_qlora --markdown     # GPT-2 small, batch 4x128, r=8 on c_attn
    python -m experiments.bench_qlora --preset=tiny --steps=2 --out=/tmp/bq.json   # a smoke run

Bytes: the base weights held as fp32, bf16, int8 and NF4 (double-quantised), for the linear layers
QLoRA quantises ('all-linear': every linear layer but the tied LM head) and for the whole base
(quantised rows keep the other parameters in bf16). Speed: one jitted training step (loss, grads
w.r.t. the adapters only, AdamW) of LoRA on a bf16 base against QLoRA on an NF4 and an int8 base
(compute in bf16, adapters r=8 on c_attn), the median of ``--steps`` calls after a compile call;
plus the time to dequantise every quantised kernel once, alone, and the number of dequantising
fusions per kernel in the compiled step (1 = each kernel dequantised once per step). Steps run in
interleaved rounds (``--steps`` of them), medians and ranges are reported. Results go to ``--out``
(JSON) and, with ``--markdown``, to the '## QLoRA' section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import lora_jax as lj
from lora_jax.train import make_train_step
from experiments.benchlib import (machine, ratio_per_round, summary, time_fn, time_interleaved,
                                  write_section)
from lora_jax import quant
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank (on the fused qkv kernels, c_attn).")
_STEPS = flags.DEFINE_integer("steps", 5, "Interleaved timed rounds (after one compile call).")
_OUT = flags.DEFINE_string("out", "bench_qlora.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's '## QLoRA' section.")

SECTION = "## QLoRA"
MIB = 2**20




def to_bf16(tree):
    """Float leaves to bf16; quantised leaves untouched."""
    return jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(jnp.bfloat16), tree,
                        is_leaf=quant.is_quantized)


def byte_table(params, layouts) -> dict:
    """MiB of the linear kernels and of the whole base per storage format."""
    linear = {t.path for t in lj.select_targets(params, ("all-linear",), rank=1, alpha=1.0)}
    flat = lj.rules.flatten(params)
    rest = {p: v for p, v in flat.items() if p not in linear}
    out = {"n_linear_params": sum(flat[p].size for p in linear),
           "n_params": sum(v.size for v in flat.values())}
    for fmt in ("fp32", "bf16", "int8", "nf4"):
        if fmt in ("fp32", "bf16"):
            dtype = jnp.float32 if fmt == "fp32" else jnp.bfloat16
            lin = sum(flat[p].size * jnp.dtype(dtype).itemsize for p in linear)
            other = sum(v.size * jnp.dtype(dtype).itemsize for v in rest.values())
        else:
            q = jax.eval_shape(lambda p: lj.quantize_params(p, "all-linear", fmt, layouts=layouts),
                               params)
            qflat = lj.rules.flatten(q)
            lin = quant.nbytes([qflat[p] for p in linear])
            other = sum(v.size * 2 for v in rest.values())
        out[fmt] = {"linear_mib": lin / MIB, "base_mib": (lin + other) / MIB}
    for fmt in ("fp32", "bf16", "int8", "nf4"):
        out[fmt]["linear_x_fp32"] = out[fmt]["linear_mib"] / out["fp32"]["linear_mib"]
        out[fmt]["base_x_fp32"] = out[fmt]["base_mib"] / out["fp32"]["base_mib"]
    return out


def make_step(model, tx):
    def loss_fn(adapters, base, tokens):
        logits = lj.apply(model, base, adapters, tokens[:, :-1], deterministic=True)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]).mean()

    # lora_jax's one train step; the batch is the token array, no rng
    return make_train_step(lambda a, base, tokens, rng: loss_fn(a, base, tokens), tx)


def dequant_fusions(hlo: str, kind: str) -> int:
    """Fused computations of compiled HLO text that decode a kernel's quantised codes (u8 NF4
    read through the 16-entry NF4 code book, s8 int8). NF4's double-quantised absmax constants
    are decoded by a fusion of their own (u8 through the 256-entry dynamic code), not counted."""
    code = {"nf4": "u8[", "int8": "s8["}[kind]
    heads = [line.split("->")[0] for line in hlo.splitlines() if line.startswith("%fused_computation")]
    return sum(1 for h in heads if code in h and (kind != "nf4" or "[16]" in h))


def run(preset: str, batch: int, seq: int, rank: int, steps: int) -> dict:
    model, cfg = get_model("gpt2", preset, dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    example = tokens[:1, :seq]
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, example)["params"]))(
        jax.random.key(1))
    layouts = lj.trace_layouts(model, params, example)
    res = {"preset": preset, "batch": batch, "seq": seq, "rank": rank, "steps": steps,
           "device": jax.devices()[0].device_kind, "bytes": byte_table(params, layouts)}
    bases = {"lora_bf16": to_bf16(params)}
    for kind in ("nf4", "int8"):
        q = jax.jit(lambda p: lj.quantize_params(p, "all-linear", kind, layouts=layouts))(params)
        bases[f"qlora_{kind}"] = to_bf16(q)
    n_kernels = len([x for x in jax.tree.leaves(bases["qlora_nf4"], is_leaf=quant.is_quantized)
                     if quant.is_quantized(x)])
    del params
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=(r".*/attn/c_attn/kernel",))
    tx = optax.adamw(1e-4)
    step = make_step(model, tx)
    fns, res["dequant_fusions_per_kernel"] = {}, {}
    for name, base in bases.items():
        adapters = lj.init_adapters(base, spec, jax.random.key(2), layouts=layouts)
        state = [adapters, tx.init(adapters)]
        if name != "lora_bf16":
            hlo = step.lower(state[0], state[1], base, tokens, None).compile().as_text()
            kind = name.split("_")[1]
            res["dequant_fusions_per_kernel"][kind] = dequant_fusions(hlo, kind) / n_kernels

        def call(state=state, base=base):
            state[0], state[1], metrics = step(state[0], state[1], base, tokens, None)
            return metrics["loss"]

        fns[name] = call
    times = time_interleaved(fns, steps)
    res["step_rounds_s"] = times
    res["step_s"] = {n: summary(t)["median"] for n, t in times.items()}
    res["step_summary"] = {n: summary(t) for n, t in times.items()}
    res["ratio_to_lora"] = {n: ratio_per_round(times, n, "lora_bf16") for n in times}
    for kind in ("nf4", "int8"):
        deq = jax.jit(lambda b: [quant.dequantize(x, jnp.bfloat16)
                                 for x in jax.tree.leaves(b, is_leaf=quant.is_quantized)
                                 if quant.is_quantized(x)])
        res[f"dequant_all_{kind}_s"] = time_fn(deq, bases[f"qlora_{kind}"], steps=steps)
    return res


def note(res: dict) -> str:
    """What the compiled steps do, from the measured numbers."""
    s, per = res["step_s"], res["dequant_fusions_per_kernel"]
    verdict = ("each dense kernel is decoded once and kept for the backward"
               if max(per.values()) == 1 else "so some kernels are decoded more than once a step")
    return (f"Both steps are mostly the frozen model's bf16 compute (forward, and the input "
            f"gradients the adapters need), the same work in both. The compiled QLoRA steps hold "
            f"{per['nf4']:.2f} (NF4) and {per['int8']:.2f} (int8) dequantising fusions per "
            f"quantised kernel ({verdict}; no remat here). Dequantising all kernels once costs "
            f"{res['dequant_all_nf4_s']:.3f} s (NF4) of the "
            f"{s['qlora_nf4'] - s['lora_bf16']:+.3f} s step difference.")


def markdown(res: dict, command: str) -> str:
    b, s = res["bytes"], res["step_summary"]
    m = res.get("machine", {})
    lines = [
        SECTION, "",
        f"GPT-2 `{res['preset']}` shape ({b['n_params'] / 1e6:.1f}M parameters, of which "
        f"{b['n_linear_params'] / 1e6:.1f}M in the 'all-linear' kernels), on `{res['device']}` "
        f"({m.get('cpu', '?')}, {m.get('cores', '?')} cores). Produced by `{command}`.", "",
        "| base weights | all-linear kernels (MiB) | × fp32 | whole base (MiB) | × fp32 |",
        "|---|---|---|---|---|",
    ]
    for fmt, label in (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8 (per channel)"),
                       ("nf4", "NF4 (blocks of 64, double-quantised)")):
        r = b[fmt]
        lines.append(f"| {label} | {r['linear_mib']:.1f} | {r['linear_x_fp32']:.3f} | "
                     f"{r['base_mib']:.1f} | {r['base_x_fp32']:.3f} |")
    lines += [
        "", "Quantised rows keep the embeddings, position table and norms in bf16; the tied LM head "
        "(`wte`) is not quantised.", "",
        f"Training step, batch {res['batch']}×{res['seq']}, LoRA r={res['rank']} on `c_attn`, "
        f"compute in bf16; {res['steps']} interleaved rounds after compile (each round runs every "
        "base once), median and range; the ratio is taken round by round:", "",
        "| base | s / step (median) | range | × LoRA on bf16 (median) | ratio range |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("lora_bf16", "LoRA, bf16 base"), ("qlora_nf4", "QLoRA, NF4 base"),
                        ("qlora_int8", "QLoRA, int8 base")):
        r = res["ratio_to_lora"][name]
        t = s[name]
        lines.append(f"| {label} | {t['median']:.3f} | {t['min']:.3f}–{t['max']:.3f} | "
                     f"{r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} |")
    lines += [
        "", f"Dequantising every quantised kernel once, alone: NF4 "
        f"{res['dequant_all_nf4_s']:.3f} s, int8 {res['dequant_all_int8_s']:.3f} s. "
        f"{res.get('note', '')}", "",
        f"Load average (1 min) at the end of the run: {m.get('load_average', 0):.1f} on "
        f"{m.get('cores', '?')} cores, shared with other people's jobs; the interleaving puts "
        "that load on every row alike, the range columns show what is left of it.", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    res = run(_PRESET.value, _BATCH.value, _SEQ.value, _RANK.value, _STEPS.value)
    res["note"] = note(res)
    res["machine"] = machine()
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if _MARKDOWN.value:
        command = "python -m experiments.bench_qlora " + " ".join(sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command.strip()))


if __name__ == "__main__":
    app.run(main)
