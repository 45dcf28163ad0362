"""Profile: where a LoRA and a full fine-tuning step spend their time, per XLA thunk.

    python -m experiments.profile_step     # GPT-2-small shape, batch 4x128, r=8

The steps are bench_peers' (same model, batch, rank and AdamW). Each is compiled, warmed up,
timed over 5 calls (each after 3 dense 2048^3 matmuls that measure the fp32 matmul rate), then
traced over 3 calls with ``jax.profiler``. The trace's thunk events are summed by kind (the
fusion name without its number): matmuls (``ynn_fusion`` = XNNPACK dots, ``dot``) against copies,
transposes, optimizer and elementwise fusions. Thunks run concurrently on the cores, so their
summed durations exceed the wall time: read the shares, not the sums. The XLA:CPU names are this
backend's; on another backend the kinds differ.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app

import lora_jax as lj
from experiments import bench_peers
from experiments.benchlib import thunk_kinds
from lora_jax.models import get_model
from lora_jax.train import make_train_step

def profile(name, call, flops, matmul, matmul_flops, rounds=5, traced=3):
    for _ in range(2):
        jax.block_until_ready(call())
    wall, mm = [], []
    for _ in range(rounds):
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(matmul())
            mm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        wall.append(time.perf_counter() - t0)
    rate = matmul_flops / statistics.median(mm)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(traced):
            jax.block_until_ready(call())
        jax.profiler.stop_trace()
        kinds = thunk_kinds(d, traced)
    total, step_ms = sum(kinds.values()), 1e3 * statistics.median(wall)
    print(f"== {name}: step {step_ms:.0f} ms (median of {rounds}), matmul rate {rate / 1e9:.0f} "
          f"GFLOP/s, MFU {flops / rate * 1e3 / step_ms:.3f}; thunk time {total:.0f} ms per step")
    for kind, ms in kinds.most_common(10):
        print(f"   {ms:8.1f} ms  {ms / total:5.3f}  {kind}")


def main(argv):
    del argv
    model, cfg = get_model("gpt2", "small")
    batch, seq, rank = 4, 128, 8
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    params = jax.jit(lambda k: lj.transform._unbox(model.init(k, tokens[:, :-1])["params"]))(
        jax.random.key(1))
    lora, _, _ = bench_peers.lora_jax_side(model, params, tokens, rank)
    tx = optax.adamw(1e-4)
    full_step = make_train_step(lambda p, _, t, rng: bench_peers.xent(
        model.apply({"params": p}, t[:, :-1]), t[:, 1:]), tx)
    state = [jax.tree.map(jnp.copy, params)]
    state.append(tx.init(state[0]))

    def full():
        state[0], state[1], metrics = full_step(state[0], state[1], {}, tokens, None)
        return metrics["loss"]

    flops = bench_peers.analytic_flops(cfg, batch, seq)["lora_step"]  # forward + input grads
    matmul, matmul_flops = bench_peers.matmul_fn()
    profile("LoRA step", lora, flops, matmul, matmul_flops)
    profile("full fine-tuning step", full, 1.5 * flops, matmul, matmul_flops)  # + weight grads


if __name__ == "__main__":
    app.run(main)
