"""A run survives SIGKILLs at random moments: >= 10 kills of ``experiments.train`` processes on
a tiny config (start-up, steps, checkpoint saves with rotation, the final window), then a rerun
to completion gives bitwise the losses of an uninterrupted run and a valid summary.json.

Every run is ``python -m experiments.train`` forked from a forkserver that has imported the
modules once (``tests/train/train_child.py``): a kill lands in a real process of the trainer,
and a restart costs a fork, not an interpreter start and the imports (a third of a run's CPU)."""

import json
import random
import time
from pathlib import Path

import pytest

from tests.procs import child_env
from tests.train import train_child
from tests.train.test_trainer import TINY_MODEL

ARGS = ["--config=configs/lora.py:steps=24",
        "--config.base.source=init", f"--config.model.overrides={TINY_MODEL}",
        "--config.data.n_train_per_task=16", "--config.data.n_eval_per_task=8",
        "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=2",
        "--config.train.eval_every=1000", "--config.train.eval_batch_size=16"]
ENV = child_env()


def _losses(workdir) -> dict:
    rows = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by SIGKILL; its step is rerun and rewritten
            pass
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_then_bitwise_equal_losses(tmp_path):
    log = tmp_path / "runs.log"
    start = lambda workdir: train_child.start(ARGS + [f"--workdir={workdir}"], ENV, log)

    def complete(workdir):
        proc = start(workdir)
        proc.join(300)
        assert proc.exitcode == 0, log.read_text()[-3000:]

    straight = tmp_path / "straight"
    complete(straight)  # compiles; the runs after it load the programs from the cache
    t0 = time.time()
    complete(tmp_path / "killed0")  # uninterrupted too: the kills are timed by its length
    full = time.time() - t0
    rng = random.Random(0)
    kills, runs = 0, [tmp_path / "killed0"]
    for attempt in range(40):
        if (runs[-1] / "summary.json").exists():  # finished between kills: kill a fresh run
            runs.append(tmp_path / f"killed{len(runs)}")
        proc = start(runs[-1])
        # Half the kills land late (saves near the end and the final window), half anywhere.
        proc.join(full * (rng.uniform(0.5, 1.1) if attempt % 2 else rng.uniform(0.0, 1.0)))
        if proc.exitcode is None:
            proc.kill()
            kills += 1
        proc.join(60)
        if kills >= 10:
            break
    assert kills >= 10
    complete(runs[-1])
    a = json.loads((straight / "summary.json").read_text())
    for killed in runs:
        assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 24, killed
        b = json.loads((killed / "summary.json").read_text())
        assert b["steps"] == 24 and b["final_train_loss"] == a["final_train_loss"]
        assert b["train_seconds"] > 0 and b["tokens_per_sec"] > 0
        assert b["final_eval_loss"] == a["final_eval_loss"]
