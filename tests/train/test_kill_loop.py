"""A run survives SIGKILLs at random moments: >= 10 kills of ``python -m experiments.train`` on a
tiny config (start-up, steps, checkpoint saves with rotation, the final window), then a rerun
to completion gives bitwise the losses of an uninterrupted run and a valid summary.json."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import child_env
from tests.train.test_trainer import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
ARGS = [sys.executable, "-m", "experiments.train", "--config=configs/lora.py:steps=24",
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
    straight = tmp_path / "straight"
    t0 = time.time()
    subprocess.run(ARGS + [f"--workdir={straight}"], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    full = time.time() - t0
    rng = random.Random(0)
    kills, runs = 0, [tmp_path / "killed0"]
    for attempt in range(40):
        if (runs[-1] / "summary.json").exists():  # finished between kills: kill a fresh run
            runs.append(tmp_path / f"killed{len(runs)}")
        proc = subprocess.Popen(ARGS + [f"--workdir={runs[-1]}"], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Half the kills land late (saves near the end and the final window), half anywhere.
        time.sleep(full * (rng.uniform(0.5, 1.1) if attempt % 2 else rng.uniform(0.0, 1.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if kills >= 10:
            break
    assert kills >= 10
    done = subprocess.run(ARGS + [f"--workdir={runs[-1]}"], cwd=ROOT, env=ENV,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    a = json.loads((straight / "summary.json").read_text())
    for killed in runs:
        assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 24, killed
        b = json.loads((killed / "summary.json").read_text())
        assert b["steps"] == 24 and b["final_train_loss"] == a["final_train_loss"]
        assert b["train_seconds"] > 0 and b["tokens_per_sec"] > 0
        assert b["final_eval_loss"] == a["final_eval_loss"]
