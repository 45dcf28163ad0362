"""Benchmark: a LoRA training step in lora_jax against its peers, qwix (JAX) and PEFT (PyTorch).

    python -m experiments.bench_peers --markdown --out=runs/bench_peers.json   # GPT-2 small, 4x128
    python -m experiments.bench_peers --preset=tiny --steps=2 --out=/tmp/bp.json  # a smoke run

All three train the same model shape (GPT-2 `--preset`, fp32, batch ``--batch`` x ``--seq``), LoRA
rank ``--rank`` (alpha 2r) on the fused qkv kernel (`c_attn`) only, with AdamW on the adapters and
the softmax cross-entropy of next-token prediction over the full vocabulary. lora_jax and qwix
adapt lora_jax's own linen GPT-2; PEFT adapts Hugging Face's `GPT2LMHeadModel` (random init, no
download). The peers are optional: qwix is the ``[bench]`` extra, and the torch side runs in a
worker process of the Python given by ``--torch_python`` (a venv with torch, transformers and
peft); a peer that cannot run is skipped with its reason printed.

Timing: every system compiles/warms up once, then ``--steps`` interleaved rounds each run one step
of every system and one dense fp32 (2048x2048)^2 matmul, so load changes hit all alike; medians
and ranges are reported, each system's time as a ratio to the fastest and as model FLOP
utilisation (analytic matmul FLOPs of the step / time / the matmul rate of the same run). The
lora_jax step is then broken down (same interleaving): its forward alone, the LM head plus
cross-entropy alone (forward and input gradient), AdamW alone, and XLA's cost analysis of the
compiled step. ``--markdown`` rewrites the '## LoRA step against peers' section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import linen as nn
from flax import traverse_util

import lora_jax as lj
from lora_jax.train import make_train_step
from experiments.benchlib import machine, summary, time_interleaved, write_section
from lora_jax.models import get_model

_PRESET = flags.DEFINE_string("preset", "small", "GPT-2 preset (lora_jax.models.gpt2_config).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length (predicted tokens per row).")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank on c_attn.")
_STEPS = flags.DEFINE_integer("steps", 5, "Interleaved timed rounds after the warm-up.")
_TORCH = flags.DEFINE_string("torch_python", "/work/venv-torch/bin/python",
                             "Python with torch, transformers and peft for the PEFT side.")
_THREADS = flags.DEFINE_integer("torch_threads", os.cpu_count() or 1, "torch.set_num_threads.")
_OUT = flags.DEFINE_string("out", "bench_peers.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## LoRA step against peers"
TARGET = r".*/attn/c_attn/kernel"


def xent(logits, labels):
    """Mean next-token cross-entropy; logits (b, t, V) float32, labels (b, t) int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def analytic_flops(cfg, batch: int, seq: int) -> dict:
    """Matmul FLOPs (2 per multiply-add) of the forward, and of a LoRA step (forward + input
    gradients; the rank-r products are ignored). ``head`` is the tied LM head's share."""
    d, n_layers, vocab, tokens = cfg.d_model, cfg.n_layers, cfg.vocab_size, batch * seq
    body = n_layers * (d * 3 * d + d * d + 2 * d * 4 * d + 2 * seq * d)  # per token
    fwd = 2 * tokens * (body + d * vocab)
    return {"forward": fwd, "lora_step": 2 * fwd, "head_fwd_bwd": 2 * 2 * tokens * d * vocab}


def matmul_fn():
    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    f = jax.jit(lambda x: x @ x)
    return (lambda: f(a)), 2 * 2048**3


def _adam_step(loss, tx):  # lora_jax's one train step; the batch is the token array
    return make_train_step(lambda t, f, tokens, rng: loss(t, f, tokens), tx)


def _runner(step, trainable, opt_state, frozen, tokens):
    state = [trainable, opt_state]

    def call():
        state[0], state[1], metrics = step(state[0], state[1], frozen, tokens, None)
        return metrics["loss"]
    return call


def lora_jax_side(model, params, tokens, rank):
    """(call, jitted step, args) of lora_jax's LoRA step."""
    layouts = lj.trace_layouts(model, params, tokens[:1, :-1])
    spec = lj.LoraSpec(rank=rank, alpha=2.0 * rank, targets=(TARGET,))
    adapters = lj.init_adapters(params, spec, jax.random.key(2), layouts=layouts)
    tx = optax.adamw(1e-4)

    def loss(adapters, base, tokens):
        return xent(lj.apply(model, base, adapters, tokens[:, :-1]), tokens[:, 1:])

    step = _adam_step(loss, tx)
    spare = jax.tree.map(jnp.copy, adapters)  # the runner's copy is donated step by step
    return _runner(step, adapters, tx.init(adapters), params, tokens), step, (
        spare, tx.init(spare), params, tokens, None)


def qwix_side(model, tokens, rank):
    """Call of qwix's LoRA step on the same linen model, or the reason it cannot run."""
    try:
        import qwix
    except ImportError as e:
        return f"qwix not importable ({e}); pip install 'lora_jax[bench]'"
    provider = qwix.LoraProvider([qwix.LoraRule(module_path=r".*attn/c_attn", rank=rank,
                                                alpha=2.0 * rank)])
    qmodel = qwix.apply_lora_to_model(model, provider)
    variables = nn.meta.unbox(qmodel.init(jax.random.key(1), tokens[:, :-1]))["params"]
    flat = traverse_util.flatten_dict(variables, sep="/")
    trainable = {k: v for k, v in flat.items() if "lora" in k}
    frozen = {k: v for k, v in flat.items() if "lora" not in k}
    tx = optax.adamw(1e-4)

    def loss(trainable, frozen, tokens):
        p = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        return xent(qmodel.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

    step = _adam_step(loss, tx)
    return _runner(step, trainable, tx.init(trainable), frozen, tokens)


TORCH_WORKER = textwrap.dedent("""
    import sys, time, torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel
    from peft import LoraConfig, get_peft_model
    d, layers, heads, vocab, batch, seq, rank, threads = map(int, sys.argv[1:9])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=rank, lora_alpha=2 * rank,
                           target_modules=["c_attn"], lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    def step():
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss.item()
    step()
    print("ready", torch.__version__, flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter(); step(); print(time.perf_counter() - t0, flush=True)
""")


class TorchWorker:
    """A PEFT training loop in a child process; ``step()`` runs one step there and returns."""

    def __init__(self, python, cfg, batch, seq, rank, threads):
        args = [str(v) for v in (cfg.d_model, cfg.n_layers, cfg.n_head, cfg.vocab_size, batch,
                                 seq, rank, threads)]
        self.proc = subprocess.Popen([python, "-c", TORCH_WORKER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            err = self.proc.stderr.read()[-600:]
            raise RuntimeError(f"torch worker did not start: {err}")
        self.version = line[1]

    def step(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def peft_side(cfg, batch, seq, rank):
    """A TorchWorker, or the reason the PEFT side cannot run."""
    if not Path(_TORCH.value).exists():
        return f"no torch Python at {_TORCH.value} (set --torch_python)"
    try:
        return TorchWorker(_TORCH.value, cfg, batch, seq, rank, _THREADS.value)
    except (RuntimeError, OSError, ValueError) as e:
        return f"PEFT worker failed: {e}"


def breakdown_fns(model, params, tokens, cfg, adapters_args):
    """Pieces of the lora_jax step, each a jitted call: forward, LM head + CE, AdamW alone."""
    adapters, _, base = adapters_args[:3]
    fwd = jax.jit(lambda a, b, t: xent(lj.apply(model, b, a, t[:, :-1]), t[:, 1:]))
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    h = jax.random.normal(jax.random.key(3), (batch, seq, cfg.d_model))
    table = params["wte"]["embedding"]
    head = jax.jit(jax.value_and_grad(
        lambda h, e, t: xent(jnp.einsum("btd,vd->btv", h, e), t[:, 1:])))
    tx = optax.adamw(1e-4)
    grads = jax.tree.map(jnp.ones_like, adapters)
    adam = jax.jit(lambda g, s, p: tx.update(g, s, p))
    opt_state = tx.init(adapters)
    return {"forward (loss only)": lambda: fwd(adapters, base, tokens),
            "LM head + CE, fwd + input grad": lambda: head(h, table, tokens),
            "AdamW on the adapters": lambda: adam(grads, opt_state, adapters)}


def run() -> dict:
    model, cfg = get_model("gpt2", _PRESET.value)
    batch, seq, rank = _BATCH.value, _SEQ.value, _RANK.value
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, tokens[:, :-1])["params"]))(
        jax.random.key(1))
    res = {"preset": _PRESET.value, "batch": batch, "seq": seq, "rank": rank,
           "device": jax.devices()[0].device_kind, "skipped": {},
           "versions": {"jax": jax.__version__}}
    mm, mm_flops = matmul_fn()
    fns = {"matmul": mm}
    fns["lora_jax"], step, args = lora_jax_side(model, params, tokens, rank)
    q = qwix_side(model, tokens, rank)
    if isinstance(q, str):
        res["skipped"]["qwix"] = q
        print("skipping qwix:", q, flush=True)
    else:
        import qwix
        fns["qwix"] = q
        res["versions"]["qwix"] = getattr(qwix, "__version__", "?")
    worker = peft_side(cfg, batch, seq, rank)
    if isinstance(worker, str):
        res["skipped"]["peft"] = worker
        print("skipping PEFT:", worker, flush=True)
    else:
        res["versions"]["torch"] = worker.version
    pieces = breakdown_fns(model, params, tokens, cfg, args)
    fns.update(pieces)
    times = time_peers(fns, worker, _STEPS.value)
    if not isinstance(worker, str):
        worker.close()
    res["rounds_s"] = times
    res["summary"] = {n: summary(t) for n, t in times.items()}
    rate = mm_flops / res["summary"]["matmul"]["median"]
    flops = analytic_flops(cfg, batch, seq)
    systems = [n for n in ("lora_jax", "qwix", "peft") if n in times]
    fastest = min(res["summary"][n]["median"] for n in systems)
    res.update(matmul_gflops=rate / 1e9, flops=flops, systems={
        n: {"ratio_to_fastest": res["summary"][n]["median"] / fastest,
            "mfu": flops["lora_step"] / res["summary"][n]["median"] / rate} for n in systems})
    cost = step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    res["xla_cost"] = {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}
    return res


def time_peers(fns: dict, worker, rounds: int) -> dict:
    """``time_interleaved`` with the torch worker's own step times slotted into every round."""
    if isinstance(worker, str):
        return time_interleaved(fns, rounds)
    peft_times = []

    def peft_round():
        peft_times.append(worker.step())

    times = time_interleaved({**fns, "peft": peft_round}, rounds)
    times["peft"] = peft_times[-rounds:]  # the worker's own clock; its first call was warm-up
    return times


def markdown(res: dict, command: str) -> str:
    m, s = res["machine"], res["summary"]
    rate = res["matmul_gflops"]
    lines = [SECTION, "", f"`{command}`", "",
             f"GPT-2 `{res['preset']}` shape, fp32, batch {res['batch']}x{res['seq']}, LoRA "
             f"r={res['rank']} on the fused qkv kernel, AdamW; {res['device']} ({m['cpu']}, "
             f"{m['cores']} cores), load average {m['load_average_start']:.1f} at the start and "
             f"{m['load_average']:.1f} at the end (a machine shared with other people's jobs). "
             f"Versions: {res['versions']}. {s['lora_jax']['n']} interleaved rounds after a "
             f"warm-up; the fp32 matmul rate of the same rounds: {rate:.0f} GFLOP/s (median).", "",
             "| system | median ms | range ms | x fastest | MFU |", "|---|---:|---:|---:|---:|"]
    for n, v in res["systems"].items():
        lines.append(f"| {n} | {s[n]['median'] * 1e3:,.0f} | {s[n]['min'] * 1e3:,.0f}–"
                     f"{s[n]['max'] * 1e3:,.0f} | {v['ratio_to_fastest']:.3f} | {v['mfu']:.3f} |")
    for n, why in res["skipped"].items():
        lines.append(f"| {n} | skipped: {why} | | | |")
    f = res["flops"]
    step_ms = s["lora_jax"]["median"] * 1e3
    lines += ["", "Where the lora_jax step's time goes (same rounds; each piece jitted alone; the "
              "floor is the piece's analytic matmul FLOPs at the measured rate):", "",
              "| piece | median ms | share of step | matmul floor ms |", "|---|---:|---:|---:|",
              f"| whole LoRA step | {step_ms:,.0f} | 1.00 | {f['lora_step'] / rate / 1e6:,.0f} |",
              f"| forward (loss only) | {s['forward (loss only)']['median'] * 1e3:,.0f} | "
              f"{s['forward (loss only)']['median'] * 1e3 / step_ms:.2f} | "
              f"{f['forward'] / rate / 1e6:,.0f} |",
              f"| LM head + CE, fwd + input grad | "
              f"{s['LM head + CE, fwd + input grad']['median'] * 1e3:,.0f} | "
              f"{s['LM head + CE, fwd + input grad']['median'] * 1e3 / step_ms:.2f} | "
              f"{f['head_fwd_bwd'] / rate / 1e6:,.0f} |",
              f"| AdamW on the adapters | {s['AdamW on the adapters']['median'] * 1e3:,.1f} | "
              f"{s['AdamW on the adapters']['median'] * 1e3 / step_ms:.3f} | 0 |", ""]
    xc = res.get("xla_cost", {})
    if xc:
        lines.append(f"XLA's cost analysis of the compiled step: {xc.get('flops', 0) / 1e9:,.1f} "
                     f"GFLOP (analytic matmul FLOPs: {f['lora_step'] / 1e9:,.1f}), "
                     f"{xc.get('bytes accessed', 0) / 2**30:,.2f} GiB accessed.")
    return "\n".join(lines) + "\n" + res.get("note", "") + "\n"


def main(argv):
    del argv
    load_start = os.getloadavg()[0]
    res = run()
    res["machine"] = {**machine(), "load_average_start": load_start}
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("systems", "summary", "matmul_gflops", "xla_cost",
                                          "skipped")}, indent=1))
    if _MARKDOWN.value:
        command = " ".join(["python -m experiments.bench_peers"] + sys.argv[1:])
        write_section(Path("BENCHMARKS.md"), markdown(res, command))


if __name__ == "__main__":
    app.run(main)
