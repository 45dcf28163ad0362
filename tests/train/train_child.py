"""``start(argv, env, log)``: ``python -m experiments.train ARGV`` in a process forked from a
forkserver that has already imported JAX, Flax and lora_jax, so a test that starts many training
processes (the SIGKILL loop) pays a fork for each rather than an interpreter start and imports.
``env`` (``tests.procs.child_env``) replaces the environment before JAX starts its backend (the
forkserver imports modules only: no backend is up before the fork); output is appended to
``log``."""

import multiprocessing
import os
import runpy
import sys

PRELOAD = ["lora_jax.train.trainer", "configs.common"]  # not experiments.train: it defines flags


def run(argv: list, env: dict, log: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.argv = ["experiments.train", *argv]
    runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)


def start(argv: list, env: dict, log) -> multiprocessing.Process:
    """Starts ``run(argv, env, log)`` in a child of this process's forkserver (preloading
    ``PRELOAD`` if it is not up yet); returns the started process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    proc = ctx.Process(target=run, args=(list(argv), env, str(log)))
    proc.start()
    return proc
