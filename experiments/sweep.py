"""Runs every point of a config's ``get_sweep(arg)``, each in its own sub-workdir of ``--workdir``.

    python -m experiments.sweep --config=configs/lora.py:small --workdir=runs/rank_targets
    python -m experiments.sweep --config=configs/methods.py:small --workdir=runs/m --parallel=2
    python -m experiments.sweep --config=configs/lora.py:full --workdir=gs://b/rank --print_commands

``--config.a.b=v`` flags apply to every point (before the point's own overrides). Rerunning the same
command skips complete points and resumes interrupted ones; it exits non-zero while any point has
failed or is unfinished, listing them. A point whose workdir holds a run of another config (the
shared flags changed since the first run, e.g. ``--config.train.steps=80`` instead of 60) is refused
with the differing fields named, never skipped: use a new ``--workdir`` for the new config.
``--print_commands`` prints one ``experiments.train`` command per point (for a pod launcher or a
job array) and runs nothing; those runs write no ``overrides.json``, and ``experiments.report``
then reads the axes from their ``run.json``.
``--batched`` trains the points that can share one job (same base, model, data, targets, mesh and
loop; differing in rank, alpha, rsLoRA, adapter dropout, seed, LoRA init, LoRA+ or optimizer) as
batched groups in this process, on the config's mesh (lora_jax/train/batched.py), each point still
in its own workdir with its own results; the others run solo as usual, and the sweep prints why
each one cannot be batched.
Summarise with ``python -m experiments.report <workdir>``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from configs import common
from lora_jax import sweep
from lora_jax.train import Experiment, from_dict
from lora_jax.train.trainer import run_identity  # what run.json records

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_sweep "
                                          "(configs/*.py[:arg]); the arg goes to get_config and "
                                          "get_sweep.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the points' workdirs.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time (processes).")
_BATCHED = flags.DEFINE_bool("batched", False, "Train points that can share a job as batched "
                             "groups (one jitted step per group); the rest run solo.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one launch command per point; run none.")
flags.mark_flags_as_required(["config", "workdir"])


def config_flag_args(argv) -> list[str]:
    """The ``--config.a.b=v`` items of ``argv``, verbatim (``--config.a.b v`` joined with '=')."""
    out, it = [], iter(argv)
    for item in it:
        if item.startswith("--config."):
            out.append(item if "=" in item else f"{item}={next(it, '')}")
    return out


def plan_batched(plan, resolve):
    """``(plan with grouped points replaced by None, groups of points)``; prints why each
    remaining point runs solo."""
    from lora_jax.train import batched  # jax and the models: only when batching

    cfgs, solo = {}, {}
    for i, point in enumerate(plan):
        try:
            cfgs[i] = from_dict(Experiment, resolve(point.overrides).to_dict())
        except Exception as e:  # noqa: BLE001 -- run_sweep reports the bad point
            solo[i] = f"config error ({type(e).__name__})"
    keys = sorted(cfgs)
    groups, why = batched.plan_groups([cfgs[i] for i in keys])
    groups = [[keys[j] for j in g] for g in groups]
    solo.update({keys[j]: reason for j, reason in why.items()})
    for i, reason in sorted(solo.items()):
        print(f"[solo] {plan[i].name}: {reason}", flush=True)
    grouped = [[plan[i] for i in g] for g in groups]
    return [p if i in solo else None for i, p in enumerate(plan)], grouped


def run_batched(config_arg, groups, resolve, identity):
    """Trains each group of points as one batched job (lora_jax.train.batched.train_group)."""
    from lora_jax.train import batched

    points = [p for g in groups for p in g]
    index = {id(p): i for i, p in enumerate(points)}
    cfg = lambda p: from_dict(Experiment, resolve(p.overrides).to_dict())
    return sweep.run_groups(
        config_arg, points, [[index[id(p)] for p in g] for g in groups],
        lambda idx: batched.train_group([cfg(points[i]) for i in idx],
                                        [points[i].workdir for i in idx]),
        identity=identity, log=lambda msg: print(msg, flush=True))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    plan = sweep.plan_points(sweep.load_sweep(config_arg), _WORKDIR.value)
    shared = config_flag_args(sys.argv[1:])
    if _PRINT.value:
        for point in plan:
            print(sweep.format_command(sweep.launch_command(config_arg, point, shared)))
        return
    print(f"sweep {config_arg}: {len(plan)} points under {_WORKDIR.value}", flush=True)
    resolve = lambda overrides: common.apply_overrides(_CONFIG.value, overrides)
    identity = lambda o: run_identity(from_dict(Experiment, resolve(o).to_dict()))
    groups = []
    if _BATCHED.value:
        plan, groups = plan_batched(plan, resolve)
    # Solo points first: their processes are forked before this one starts JAX's threads.
    result = sweep.run_sweep(
        config_arg, [p for p in plan if p is not None], extra_flags=shared,
        parallel=_PARALLEL.value, validate=resolve, identity=identity,
        log=lambda msg: print(msg, flush=True))
    if groups:
        result = sweep.merge_results(result, run_batched(config_arg, groups, resolve, identity))
    print(f"sweep: {len(result.done)} done, {len(result.skipped)} already complete, "
          f"{len(result.interrupted)} unfinished, {len(result.failed)} failed", flush=True)
    if not result.ok:
        lines = [f"  {name}: {reason.splitlines()[0]}" for name, reason in result.failed.items()]
        lines += [f"  {name}: unfinished (rerun to resume)" for name in result.interrupted]
        sys.exit("sweep incomplete:\n" + "\n".join(lines))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
