r"""Regenerates the README's results table ("Methods and what they reach here") as mean ± std over
seeds, and checks that a fresh run lands inside it.

    nice -n 10 python -m experiments.reproduce                 # 4 configs x seeds 0,1,2
    python -m experiments.reproduce --readme                   # ... and rewrite README's table
    python -m experiments.reproduce --check                    # one fresh LoRA seed vs the band
    python -m experiments.reproduce --configs=lora --seeds=0 --steps=20 --pretrain_steps=40 \
        --out=/tmp/smoke.json                                  # a smoke run (minutes, not a result)

A seed ``s`` changes the whole pipeline: the pretrained base (``base.seed``), the data sampled for
pretraining, adaptation and evaluation (``data.seed``), and the adapters' init and data order
(``seed``); seed 0 is the configs' default run. Each run lives in ``--workdir``/<row>_s<seed> (a
suffix names a ``--steps``/``--pretrain_steps`` override) with its log beside it; a finished run is
reused (the trainer returns its ``summary.json``, and refuses a workdir holding another config).

The per-run numbers, with each run's recorded environment, go to ``--out`` (default
``docs/results/default.json``): the one source of truth. The table is rendered from it (printed,
written beside it as ``.md`` and, with ``--readme``, into README.md between the markers
``<!-- reproduce:begin -->`` and ``<!-- reproduce:end -->``), and ``--check`` reads its band from
it: mean ± max(3·std, floor) per metric, with floors ``FLOORS`` (std is the sample std over the
seeds; the floor keeps a 3-seed std that came out small by chance from making the band
meaningless: 0.03 accuracy is about 8 of 256 eval examples). Trainable parameters must match
exactly. ``--check`` runs ``--check_seed`` (default 3, a seed not in the table, so its base is
pretrained too) into ``--workdir``/check/lora_s<seed> (reused once complete: delete it to run
afresh) and exits 1 if a metric falls outside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from configs import common

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
TASKS = ("digits_reverse", "kv_recall")
METRICS = ("trainable_params", *TASKS, "mean", "eval_loss")
FLOORS = {"digits_reverse": 0.03, "kv_recall": 0.03, "mean": 0.03, "eval_loss": 0.03}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a config file, its ``:arg``, and how the README names it."""

    config: str  # module under configs/
    arg: str
    label: str


ROWS = {
    "lora": Row("lora", "", "`configs/lora.py` (r=8, all-linear)"),
    "qlora": Row("qlora", "", "`configs/qlora.py` (NF4 base)"),
    "losa": Row("losa", "sparsity=0.7",
                "`configs/losa.py:sparsity=0.7` (T=5; A, B counted at r_max 16)"),
    "full_ft": Row("full_ft", "", "`configs/full_ft.py`"),
}
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when run as a script, so tests and other
    experiments (whose flags share absl's one registry: --seeds, --workdir) can import this."""
    flags.DEFINE_list("configs", list(ROWS), f"Rows to run, of {list(ROWS)}.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each: base, data and run seed).")
    flags.DEFINE_integer("steps", None, "Override train.steps (smoke runs only).")
    flags.DEFINE_integer("pretrain_steps", None, "Override base.pretrain_steps (smoke runs).")
    flags.DEFINE_string("workdir", "runs/reproduce", "Parent of the runs' workdirs.")
    flags.DEFINE_string("out", "docs/results/default.json", "Per-run results (JSON); the "
                        "table goes beside it as .md.")
    flags.DEFINE_bool("readme", False, "Rewrite README.md's table between the markers.")
    flags.DEFINE_bool("check", False, "Run one fresh LoRA seed; compare with --out's band.")
    flags.DEFINE_integer("check_seed", 3, "The seed --check runs.")


# ----------------------------------------------------------------------------- configs and runs


def overrides(seed: int, steps: int | None = None, pretrain_steps: int | None = None) -> dict:
    """The dotted overrides of one seed (and a smoke run's shorter schedules)."""
    out = {"seed": seed, "base.seed": seed, "data.seed": seed}
    if steps is not None:
        out["train.steps"] = steps
    if pretrain_steps is not None:
        out["base.pretrain_steps"] = pretrain_steps
    return out


def experiment(row: Row, seed: int, steps=None, pretrain_steps=None):
    """The ``Experiment`` of ``row`` at ``seed``: what ``experiments.train --config=configs/
    <row>.py[:arg] --config.seed=s --config.base.seed=s --config.data.seed=s`` runs."""
    from lora_jax.train import Experiment, from_dict

    config = importlib.import_module(f"configs.{row.config}").get_config(row.arg)
    config = common.apply_overrides(config, overrides(seed, steps, pretrain_steps))
    return from_dict(Experiment, config.to_dict())


def run_name(name: str, seed: int, steps=None, pretrain_steps=None) -> str:
    """``'lora_s1'``; a smoke run's overrides are in the name (``'lora_s1_steps20_pre40'``)."""
    return (f"{name}_s{seed}" + (f"_steps{steps}" if steps is not None else "")
            + (f"_pre{pretrain_steps}" if pretrain_steps is not None else ""))


def command(row: Row, seed: int, workdir: str) -> str:
    """The ``experiments.train`` command that runs the same experiment on its own."""
    arg = f":{row.arg}" if row.arg else ""
    return (f"python -m experiments.train --config=configs/{row.config}.py{arg} "
            + " ".join(f"--config.{k}={v}" for k, v in overrides(seed).items())
            + f" --workdir={workdir}")


def metrics_of(summary: dict) -> dict:
    """The table's numbers from one run's ``summary.json``."""
    acc = summary["accuracy"]
    out = {"trainable_params": summary["trainable_params"], "eval_loss": summary["final_eval_loss"],
           "mean": acc["mean"], **{t: acc[t] for t in TASKS}}
    if "sparsity" in summary:  # LoSA: the merged model's measured sparsity
        out["sparsity"] = summary["sparsity"]
    return out


def run_one(name: str, seed: int, root: Path, steps=None, pretrain_steps=None) -> dict:
    """Runs (or reuses) one seed of one row; returns its record for the results file."""
    from lora_jax.train import train_and_evaluate

    workdir = root / run_name(name, seed, steps, pretrain_steps)
    timing = root / f"{workdir.name}.time.json"  # the wall time of the call that ran it
    reused = (workdir / "summary.json").exists()
    cfg = experiment(ROWS[name], seed, steps, pretrain_steps)
    t0, load0 = time.perf_counter(), load_average()
    with open(root / f"{workdir.name}.log", "a") as f, contextlib.redirect_stdout(f):
        summary = train_and_evaluate(cfg, workdir)
    if summary.get("interrupted"):
        raise SystemExit(f"{workdir}: interrupted at step {summary['step']}; rerun to resume")
    if not reused:
        timing.write_text(json.dumps({"wall_seconds": time.perf_counter() - t0,
                                      "load_average": [load0, load_average()]}) + "\n")
    timed = json.loads(timing.read_text()) if timing.exists() else {}  # None: another command
    recorded = json.loads((workdir / "run.json").read_text()).get("recorded", {})
    env = recorded.get("environment", {})
    return {"name": name, "seed": seed, "workdir": str(workdir), **metrics_of(summary),
            "train_seconds": summary["train_seconds"], "base_eval_loss": summary["base_eval_loss"],
            "base_accuracy": summary["base_accuracy"]["mean"],
            "wall_seconds": timed.get("wall_seconds"), "load_average": timed.get("load_average"),
            "reused": reused,
            "environment": {k: env.get(k) for k in ("cpu", "jax", "backend", "devices")}
            | {"git_commit": (env.get("code") or {}).get("git_commit")}}


# ----------------------------------------------------------------------------- the table


def stats(values: list[float]) -> tuple[float, float]:
    """``(mean, sample std)``; std is 0.0 for one value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(runs: list[dict]) -> dict:
    """``{row: {'n': seeds, 'seeds': [...], metric: (mean, std), ...}}`` in ``ROWS`` order."""
    out = {}
    for name in [n for n in ROWS if any(r["name"] == n for r in runs)]:
        rs = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        keys = [m for m in (*METRICS, "sparsity") if m in rs[0]]
        out[name] = {"n": len(rs), "seeds": [r["seed"] for r in rs],
                     **{m: stats([r[m] for r in rs]) for m in keys}}
    return out


def _cell(metric: str, mean: float, std: float) -> str:
    if metric == "trainable_params":
        return f"{mean:,.0f}" if std == 0 else f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(agg: dict) -> str:
    """The README's table: one row per config, mean ± std over its seeds."""
    n_all = {a["n"] for a in agg.values()}
    lines = ["| config | trainable params | digits_reverse | kv_recall | mean | eval loss |",
             "|---|---|---|---|---|---|"]
    for name, a in agg.items():
        label = ROWS[name].label
        if "sparsity" in a:
            label += f"; merged sparsity {a['sparsity'][0]:.3f}"
        if len(n_all) > 1:
            label += f" ({a['n']} seed{'s' * (a['n'] > 1)})"
        lines.append(f"| {label} | " + " | ".join(_cell(m, *a[m]) for m in METRICS) + " |")
    return "\n".join(lines)


def machine_line(results: dict) -> str:
    """Where the runs came from: CPU, backend, jax, commit(s), and the load while reproducing."""
    envs = [r["environment"] for r in results["runs"]]
    join = lambda k: ", ".join(sorted({str(e.get(k)) for e in envs}))
    commits = sorted({(e.get("git_commit") or "unknown")[:7] for e in envs})
    loads = [x for r in results["runs"] for x in (r.get("load_average") or [])]
    missing = sum(not r.get("load_average") for r in results["runs"])
    load = (f"; load average {min(loads):.1f} to {max(loads):.1f} at the runs' starts and ends"
            if loads else "; load average not recorded")
    if loads and missing:
        load += f" (not recorded for {missing} of {len(results['runs'])} runs)"
    return (f"Machine: {join('cpu')} ({join('backend')}, {join('devices')}), jax {join('jax')}, "
            f"commit {', '.join(commits)}{load}")


def render(results: dict) -> str:
    """The README block: how to regenerate it, the machine, the table."""
    agg = aggregate(results["runs"])
    seeds = sorted({s for a in agg.values() for s in a["seeds"]})
    first = next(iter(agg))  # its base evals: one per seed (QLoRA's is quantised, LoSA's pruned)
    bases = [r for r in results["runs"] if r["name"] == first]
    loss = stats([r["base_eval_loss"] for r in bases])
    acc = max(r.get("base_accuracy", 0.0) for r in bases)
    return "\n".join([
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))} (a seed changes the "
        "pretrained base, the data and the adapters; seed 0 is the configs' default run), from "
        "`docs/results/default.json`; regenerate with `nice -n 10 python -m experiments.reproduce "
        f"--readme`. The pretrained bases score at most {acc:.3f} mean accuracy on the held-out "
        f"tasks, eval loss {loss[0]:.3f} ± {loss[1]:.3f} (as the {first} runs see them).",
        machine_line(results) + ".", "", markdown_table(agg)])


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between the markers replaced by ``block``."""
    if MARK_BEGIN not in text or MARK_END not in text:
        raise ValueError(f"README.md has no {MARK_BEGIN} ... {MARK_END} block; add the two "
                         "markers where the table goes")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    return f"{head}{MARK_BEGIN}\n{block}\n{MARK_END}{tail}"


# ----------------------------------------------------------------------------- the check


def band(agg_row: dict, metric: str) -> tuple[float, float]:
    """``(lo, hi)`` a fresh seed should land in: mean ± max(3·std, floor), within [0, 1] for
    accuracies; exact for the parameter count."""
    mean, std = agg_row[metric]
    half = max(3 * std, FLOORS.get(metric, 0.0))
    top = 1.0 if metric in (*TASKS, "mean") else math.inf  # accuracies stay in [0, 1]
    return max(mean - half, 0.0), min(mean + half, top)


def compare(run: dict, agg_row: dict) -> list[tuple[str, float, float, float, bool]]:
    """``[(metric, value, lo, hi, inside)]`` of one run against a row's band."""
    out = []
    for m in METRICS:
        lo, hi = band(agg_row, m)
        out.append((m, run[m], lo, hi, lo - 1e-9 <= run[m] <= hi + 1e-9))
    return out


def format_comparison(rows) -> str:
    lines = [f"{'metric':<17} {'fresh':>9}   band"]
    fmt = lambda m, x: f"{x:,.0f}" if m == "trainable_params" else f"{x:.4f}"
    lines += [f"{m:<17} {fmt(m, v):>9}   [{fmt(m, lo)}, {fmt(m, hi)}]  {'ok' if ok else 'OUTSIDE'}"
              for m, v, lo, hi, ok in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def load_average() -> float:
    return os.getloadavg()[0]


def cpu() -> str:
    from lora_jax.train.workdir import cpu_model  # here: the table functions need no JAX
    return cpu_model()


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def check(results_path: Path, root: Path, seed: int) -> int:
    results = json.loads(results_path.read_text())
    agg = aggregate(results["runs"])
    if "lora" not in agg:
        raise SystemExit(f"{results_path} has no lora runs to take a band from")
    if seed in agg["lora"]["seeds"]:
        raise SystemExit(f"--check_seed={seed} is one of the table's seeds "
                         f"{agg['lora']['seeds']}; pick another")
    root = root / "check"
    root.mkdir(parents=True, exist_ok=True)
    print(f"check: lora seed {seed} in {root}/lora_s{seed} (reused if complete: delete it for "
          f"a fresh run; log {root}/lora_s{seed}.log)", flush=True)
    run = run_one("lora", seed, root)
    rows = compare(run, agg["lora"])
    print(f"lora seed {seed} vs {results_path} (seeds {agg['lora']['seeds']}; band = mean ± "
          f"max(3·std, floor)):\n{format_comparison(rows)}")
    return 0 if all(ok for *_, ok in rows) else 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    root, out = Path(FLAGS.workdir), Path(FLAGS.out)
    if FLAGS.check:
        if FLAGS.steps is not None or FLAGS.pretrain_steps is not None:
            raise app.UsageError("--check compares with the full-length runs; drop --steps and "
                                 "--pretrain_steps")
        raise SystemExit(check(out, root, FLAGS.check_seed))
    unknown = [c for c in FLAGS.configs if c not in ROWS]
    if unknown:
        raise app.UsageError(f"--configs: unknown {unknown}; known {list(ROWS)}")
    seeds = [int(s) for s in FLAGS.seeds]
    root.mkdir(parents=True, exist_ok=True)
    plan = [(c, s) for s in seeds for c in FLAGS.configs]  # seed-major: one base at a time
    runs = []
    print(f"reproduce: {len(plan)} runs under {root}; CPU {cpu()}; load average "
          f"{load_average():.2f}; commit {git_commit()}", flush=True)
    for i, (name, seed) in enumerate(plan, 1):
        name_s = run_name(name, seed, FLAGS.steps, FLAGS.pretrain_steps)
        print(f"[{i}/{len(plan)}] {name_s}: {command(ROWS[name], seed, str(root / name_s))} "
              f"(log {root / name_s}.log)", flush=True)
        r = run_one(name, seed, root, FLAGS.steps, FLAGS.pretrain_steps)
        runs.append(r)
        took = ("reused, " if r["reused"] else "") + (
            f"{r['wall_seconds']:.0f} s wall" if r["wall_seconds"] is not None else "wall unknown")
        print(f"    {took}, train {r['train_seconds']:.0f} s: mean {r['mean']:.3f}, eval loss "
              f"{r['eval_loss']:.4f}", flush=True)
    results = {"command": " ".join(["python -m experiments.reproduce", *sys.argv[1:]]),
               "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    block = render(results)
    out.with_suffix(".md").write_text(block + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}\n\n{block}")
    if FLAGS.readme:
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), block))
        print(f"rewrote the table in {readme}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
