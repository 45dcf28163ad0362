"""Benchmark: NNX adapters factored (module substitution) vs materialised (merge per call).

    python -m experiments.bench_nnx                     # 4 Linear(1024, 1024), 8x16 tokens, r=8
    python -m experiments.bench_nnx --d=256 --rounds=3  # a smoke run

One training step's work (loss and gradient w.r.t. the adapters, jitted) of an NNX MLP whose every
Linear has a LoRA adapter, two ways: ``lj.nnx.apply`` (factored: x·A·B per layer) and
``lj.nnx.merge(model, adapters)(x)`` (materialised: W + s·A B formed per layer per call). The
two are timed in interleaved rounds in one process; the figure is the median ratio with its
min–max spread over rounds. Materialising costs d_in·d_out per layer per call, the factored path
tokens·(d_in + d_out)·r, so the ratio grows with d and shrinks with the token count.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import lora_jax as lj
from experiments.benchlib import time_fn

_D = flags.DEFINE_integer("d", 1024, "Width of each Linear (d x d).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Number of Linear layers.")
_TOKENS = flags.DEFINE_integer("tokens", 128, "Tokens per batch (rows of x).")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (each times both modes).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per mode per round.")


class MLP(nnx.Module):
    def __init__(self, d: int, n: int, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(n)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def main(argv):
    del argv
    model = MLP(_D.value, _LAYERS.value, nnx.Rngs(0))
    spec = lj.LoraSpec(rank=_RANK.value, alpha=2.0 * _RANK.value, targets=(r"layers/\d+/kernel",))
    adapters = lj.init_adapters(lj.nnx.params(model), spec, jax.random.key(1),
                                layouts=lj.nnx.layouts(model))
    x = jax.random.normal(jax.random.key(2), (_TOKENS.value, _D.value))
    modes = {
        "factored": lambda a: jnp.mean(lj.nnx.apply(model, a, x) ** 2),
        "materialised": lambda a: jnp.mean(lj.nnx.merge(model, a)(x) ** 2),
    }
    steps = {k: jax.jit(jax.grad(f)) for k, f in modes.items()}
    times = {k: [] for k in steps}
    for _ in range(_ROUNDS.value):
        for k, f in steps.items():
            times[k].append(time_fn(f, adapters, steps=_STEPS.value))
    ratios = [m / f for m, f in zip(times["materialised"], times["factored"])]
    for k, t in times.items():
        print(f"{k:>13}: median {1e3 * statistics.median(t):.2f} ms per step "
              f"(rounds {', '.join(f'{1e3 * v:.2f}' for v in t)})")
    print(f"materialised / factored: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {_ROUNDS.value} rounds; "
          f"d={_D.value}, layers={_LAYERS.value}, tokens={_TOKENS.value}, r={_RANK.value}")


if __name__ == "__main__":
    app.run(main)
