"""Benchmark: a sweep's points trained as one batched step against one after another.

    python -m experiments.bench_batched --markdown                  # default experiment, 8 points
    python -m experiments.bench_batched --preset=small --ranks=8 --batch=8 --markdown  # GPT-2-small

One process, one frozen base (the default experiment's model from a random init: speed does not
depend on the base's values), the default data, batch size and sequence length. The points are
rank {4, 8} × lr {1e-3, 3e-3} × seed {0, 1} (``--ranks=8``: every point rank 8). Timed in
interleaved rounds after compiling (every variant once per round, so load from other processes
hits both alike), medians and ranges reported:

- ``sequential``: each point's own jitted solo step (``trainer.make_steps``), ``--steps`` steps per
  point, one point after another: what K solo runs do, without their start-up;
- ``batched``: ``--steps`` steps of ``batched.make_group_step`` over all K points at once.

Both advance the same points from the same init over the same batches, so at the end each point's
last loss must agree (printed: the largest difference). Compile times are reported apart (one
program for the group against K for the sequential runs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchlib import machine, ratio_per_round, summary, time_interleaved, write_section
from lora_jax import data as D
from lora_jax.train import Experiment, batched, trainer
from lora_jax.train.config import AdapterConfig, BaseConfig, ModelConfig, OptimConfig

_PRESET = flags.DEFINE_string("preset", "tiny", "GPT-2 preset (the default experiment's: tiny).")
_RANKS = flags.DEFINE_list("ranks", ["4", "8"], "Adapter ranks swept.")
_BATCH = flags.DEFINE_integer("batch", 32, "Each point's batch size (default experiment's: 32).")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per point per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed interleaved rounds (after compiling).")
_OUT = flags.DEFINE_string("out", "runs/bench_batched.json", "Where to write the JSON results.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Rewrite BENCHMARKS.md's section.")

SECTION = "## Batched sweeps"


def sweep_points(ranks, preset: str, batch: int) -> list[Experiment]:
    """rank × lr {1e-3, 3e-3} × seed {0, 1} on the default experiment (8 points for 2 ranks;
    one rank: 4 points, repeated with seeds 2, 3 to make 8)."""
    seeds = (0, 1) if len(ranks) > 1 else (0, 1, 2, 3)
    base = Experiment(model=ModelConfig(preset=preset), base=BaseConfig(source="init"))
    return [dataclasses.replace(base, seed=s, adapter=AdapterConfig(rank=r, alpha=2.0 * r),
                                optim=OptimConfig(lr=lr),
                                train=dataclasses.replace(base.train, batch_size=batch))
            for r in ranks for lr in (1e-3, 3e-3) for s in seeds]


def main(argv):
    del argv
    cfgs = sweep_points([int(r) for r in _RANKS.value], _PRESET.value, _BATCH.value)
    assert batched.plan_groups(cfgs)[0] == [list(range(len(cfgs)))]
    c0, k, n = cfgs[0], len(cfgs), _STEPS.value
    tok = D.get_tokenizer(c0.data.tokenizer)
    model, _, _ = trainer.build_model(c0.model, tok.vocab_size)
    train_arrays, _, _ = trainer.load_data(c0.data, tok)
    example = jnp.zeros((1, c0.data.seq_len), jnp.int32)
    params = trainer.base_params(c0, model, None, example)
    setups = [trainer.adapter_setup(c, model, params, example) for c in cfgs]
    loaders = [D.ArrayLoader(train_arrays, c.train.batch_size, seed=c.seed) for c in cfgs]

    solo_steps = [trainer.make_steps(s)[0] for s in setups]
    solo = {"t": [s.trainable for s in setups], "o": [s.tx.init(s.trainable) for s in setups],
            "step": 0, "loss": [None] * k}
    frozen = [s.frozen for s in setups]

    def sequential():
        for i in range(k):
            for j in range(n):
                rng = jax.random.fold_in(jax.random.key(cfgs[i].seed + 2), solo["step"] + j + 1)
                solo["t"][i], solo["o"][i], out = solo_steps[i](
                    solo["t"][i], solo["o"][i], frozen[i], loaders[i].batch(solo["step"] + j), rng)
                solo["loss"][i] = out["loss"]
        solo["step"] += n
        return solo["loss"]

    group_step = batched.make_group_step(model, cfgs, setups)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    grp = {"t": tuple(copy(s.trainable) for s in setups),
           "o": tuple(s.tx.init(s.trainable) for s in setups), "step": 0, "loss": None}
    states = tuple(s.frozen["state"] for s in setups)

    def together():
        for j in range(n):
            parts = [ld.batch(grp["step"] + j) for ld in loaders]
            batch = {key: np.stack([b[key] for b in parts]) for key in parts[0]}
            grp["t"], grp["o"], out = group_step(grp["t"], grp["o"], params, states, batch,
                                                 np.int32(grp["step"] + j + 1))
            grp["loss"] = out["loss"]
        grp["step"] += n
        return grp["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(sequential())
    compile_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(together())
    compile_grp = time.perf_counter() - t0
    times = time_interleaved({"sequential": sequential, "batched": together}, _ROUNDS.value)
    diff = float(np.max(np.abs(np.asarray(grp["loss"]) - np.asarray(solo["loss"]))))
    point_steps = k * n
    res = {
        "preset": _PRESET.value, "points": k, "ranks": sorted({c.adapter.rank for c in cfgs}),
        "batch_per_point": c0.train.batch_size, "seq": c0.data.seq_len, "steps_per_round": n,
        "first_round_seconds_incl_compile": {"sequential": compile_seq, "batched": compile_grp},
        "sequential": summary(times["sequential"]), "batched": summary(times["batched"]),
        "speedup_per_round": ratio_per_round(times, "sequential", "batched"),
        "point_steps_per_sec": {m: point_steps / summary(times[m])["median"] for m in times},
        "max_abs_loss_diff": diff, "steps_done": grp["step"], **machine(),
    }
    print(json.dumps(res, indent=1))
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(res, indent=1))
    if _MARKDOWN.value:
        write_section(Path("BENCHMARKS.md"), markdown(res))


def markdown(res: dict) -> str:
    s, b, sp = res["sequential"], res["batched"], res["speedup_per_round"]
    f = res["first_round_seconds_incl_compile"]
    return f"""{SECTION} ({res['preset']}, {res['points']} points)

`python -m experiments.bench_batched --preset={res['preset']} --ranks={','.join(map(str, res['ranks']))} --batch={res['batch_per_point']} --steps={res['steps_per_round']} --rounds={s['n']} --markdown` ({res['points']} points: ranks {res['ranks']} × lr
{{1e-3, 3e-3}} × seeds; batch {res['batch_per_point']} × seq {res['seq']} per point;
{res['steps_per_round']} steps per point per round; {s['n']} interleaved rounds). {res['cpu']},
{res['cores']} cores, load average {res['load_average']:.1f} at the end (the machine is shared).

| | seconds per round (median [min, max]) | point-steps/s | first round incl. compile |
|---|---|---|---|
| sequential (each point's solo step) | {s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}] | {res['point_steps_per_sec']['sequential']:.1f} | {f['sequential']:.1f} s |
| batched (one step for all points) | {b['median']:.2f} [{b['min']:.2f}, {b['max']:.2f}] | {res['point_steps_per_sec']['batched']:.1f} | {f['batched']:.1f} s |

Speed-up per round: {sp['median']:.2f}× [{sp['min']:.2f}, {sp['max']:.2f}]. Results equal: after
{res['steps_done']} steps each point's loss differs by at most {res['max_abs_loss_diff']:.1e}
between the two. Each point-step is the same work either way (the base runs over every point's
rows); batching saves dispatch, K−1 compilations and K−1 start-ups, not FLOPs, so on two busy CPU
cores the steady-state gain is small; an accelerator that a single point leaves idle is where the
issue expects more (not measured here: no accelerator in this session).
"""


if __name__ == "__main__":
    app.run(main)
