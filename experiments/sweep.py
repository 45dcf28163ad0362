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
Summarise with ``python -m experiments.report <workdir>``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from configs import common
from lora_jax import sweep
from lora_jax.train import Experiment, from_dict
from lora_jax.train.trainer import _identity as run_identity  # what run.json records

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_sweep "
                                          "(configs/*.py[:arg]); the arg goes to get_config and "
                                          "get_sweep.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the points' workdirs.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time (processes).")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one launch command per point; run none.")
flags.mark_flags_as_required(["config", "workdir"])


def config_flag_args(argv) -> list[str]:
    """The ``--config.a.b=v`` items of ``argv``, verbatim (``--config.a.b v`` joined with '=')."""
    out, it = [], iter(argv)
    for item in it:
        if item.startswith("--config."):
            out.append(item if "=" in item else f"{item}={next(it, '')}")
    return out


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
    result = sweep.run_sweep(
        config_arg, plan, extra_flags=shared, parallel=_PARALLEL.value, validate=resolve,
        identity=lambda o: run_identity(from_dict(Experiment, resolve(o).to_dict())),
        log=lambda msg: print(msg, flush=True))
    print(f"sweep: {len(result.done)} done, {len(result.skipped)} already complete, "
          f"{len(result.interrupted)} unfinished, {len(result.failed)} failed", flush=True)
    if not result.ok:
        lines = [f"  {name}: {reason.splitlines()[0]}" for name, reason in result.failed.items()]
        lines += [f"  {name}: unfinished (rerun to resume)" for name in result.interrupted]
        sys.exit("sweep incomplete:\n" + "\n".join(lines))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
