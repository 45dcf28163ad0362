"""``python tests/train/pause_child.py STEP ARGS...`` runs ``experiments.train ARGS`` but, right
after train step STEP is logged, prints 'paused at step STEP' and waits for a SIGTERM.

A test that signals a real process then knows where the signal lands, however fast or loaded
the machine (a 40-step tiny run can finish between two polls of its metrics file)."""

import runpy
import sys
import time

from lora_jax.train import trainer

STEP = int(sys.argv.pop(1))
_write = trainer.MetricsWriter.write


def write_then_wait(self, step, split, **values):
    _write(self, step, split, **values)
    if split == "train" and step == STEP:
        print(f"paused at step {step}", flush=True)
        deadline = time.time() + 300
        while not trainer.PREEMPTION.requested and time.time() < deadline:
            time.sleep(0.02)


trainer.MetricsWriter.write = write_then_wait
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
