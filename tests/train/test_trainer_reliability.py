"""The trainer's guarantees (docs/reliability.md): non-finite steps stop the run with one line and
keep the last good checkpoint (or are skipped), a rerun after the final checkpoint writes a valid
summary, metrics carry lr / grad norm / a step-0 eval, bad configs never touch the workdir, the
workdir lock, data pinned by content, and SIGTERM at start-up and in the final phase."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer
from lora_jax.train import workdir as wd
from tests.procs import child_env
from tests.train.test_trainer import TINY_MODEL, load_config, tiny

ROOT = Path(__file__).resolve().parents[2]


def _cfg(steps=6, optim=None, data=None, **train):
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=steps)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, **train),
        optim=dataclasses.replace(cfg.optim, **(optim or {})),
        data=dataclasses.replace(cfg.data, **(data or {})))


def _rows(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- non-finite steps


def test_nan_lr_stops_at_step_1_naming_the_update_and_saves_nothing(tmp_path):
    cfg = _cfg(optim={"lr": float("nan")}, checkpoint_every=1)
    with pytest.raises(trainer.NonFiniteError) as e:
        train_and_evaluate(cfg, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.match(r"step 1: non-finite training \(loss [0-9.]+, gradient norm [0-9.]+\); "
                    r"first non-finite: update \[", msg), msg
    assert "no checkpoint was saved before it" in msg and "skip_nonfinite" in msg
    assert not (tmp_path / "summary.json").exists()
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_huge_lr_stops_and_keeps_the_last_good_checkpoint_which_restores(tmp_path):
    cfg = _cfg(steps=8, optim={"lr": 1e30}, checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(trainer.NonFiniteError, match=r"last good checkpoint is step") as e:
        train_and_evaluate(cfg, tmp_path)
    bad, good = map(int, re.search(r"^step (\d+):.*last good checkpoint is step (\d+)",
                                   str(e.value)).groups())
    assert good == bad - 1 >= 1
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("[0-9]*"))
    assert steps[-1] == good  # the bad state was never saved, rotation kept the good one
    # A rerun restores the last good step (checksums verified) and meets the same bad step.
    with pytest.raises(trainer.NonFiniteError, match=rf"^step {bad}:.*last good checkpoint is "
                                                     rf"step {good} "):
        train_and_evaluate(cfg, tmp_path)


def test_skip_nonfinite_finishes_and_counts_the_skipped_steps(tmp_path):
    cfg = _cfg(steps=4, optim={"lr": float("nan")}, skip_nonfinite=True)
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["skipped_steps"] == 4 and summary["steps"] == 4
    assert summary["final_train_loss"] is None  # no finite step was taken
    assert summary["final_eval_loss"] == pytest.approx(summary["base_eval_loss"])  # unchanged
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


# ----------------------------------------------------------------------------- summary, metrics


def test_rerun_after_the_final_checkpoint_writes_the_same_valid_summary(tmp_path, capsys):
    cfg = _cfg(log_every=4)  # step 6 is logged as the last step; the rerun runs no step
    first = train_and_evaluate(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()  # as a kill right after the final checkpoint
    again = train_and_evaluate(cfg, tmp_path)
    assert "resuming from step 6" in capsys.readouterr().out
    assert again["final_train_loss"] == first["final_train_loss"] is not None
    assert again["train_seconds"] == first["train_seconds"] > 0
    assert again["tokens_per_sec"] == first["tokens_per_sec"] > 0
    json.loads((tmp_path / "summary.json").read_text())  # valid JSON (no NaN)
    # A rerun of the complete workdir returns the summary and rewrites nothing.
    before = (tmp_path / "summary.json").read_bytes()
    assert train_and_evaluate(cfg, tmp_path) == again
    assert (tmp_path / "summary.json").read_bytes() == before


def test_train_seconds_add_up_across_a_resume(tmp_path, monkeypatch):
    cfg = _cfg(checkpoint_every=1000)
    write = trainer.MetricsWriter.write

    def write_then_term(self, step, split, **values):
        write(self, step, split, **values)
        if split == "train" and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.MetricsWriter, "write", write_then_term)
    assert train_and_evaluate(cfg, tmp_path)["interrupted"]
    segment = wd.read_json(tmp_path / "progress.json", "")["steps"]["3"]["train_seconds"]
    monkeypatch.setattr(trainer.MetricsWriter, "write", write)
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["train_seconds"] > segment > 0


def test_metrics_log_lr_grad_norm_and_a_step_0_eval(tmp_path):
    cfg = _cfg(steps=4, optim={"schedule": "constant", "warmup_steps": 2, "lr": 1e-3})
    train_and_evaluate(cfg, tmp_path)
    rows = _rows(tmp_path)
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals[0]["step"] == 0 and np.isfinite(evals[0]["loss"]) and "accuracy" in evals[0]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["lr"] for r in train] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert all(r["grad_norm"] > 0 for r in train)


# ----------------------------------------------------------------------------- the workdir


@pytest.mark.parametrize("field, value, match", [
    ("optim", {"name": "adam"}, "unknown optim.name 'adam'"),
    ("optim", {"schedule": "linear"}, "unknown optim.schedule 'linear'"),
    ("data", {"kind": "csv"}, "unknown data.kind 'csv'"),
    ("data", {"tasks": ("digits_reverse", "nope")}, r"unknown data.tasks \['nope'\]"),
    ("model", {"family": "gpt3"}, "gpt3"),
    ("model", {"hf_path": "/nonexistent"}, "has no config.json"),
])
def test_a_bad_config_is_refused_before_the_workdir_exists(tmp_path, field, value, match):
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, **{field: dataclasses.replace(getattr(cfg, field), **value)})
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_locked_workdir_is_refused(tmp_path):
    with wd.WorkdirLock(tmp_path):
        with pytest.raises(wd.WorkdirBusy, match=f"workdir {tmp_path} is in use by pid "
                                                 f"{os.getpid()}"):
            train_and_evaluate(_cfg(), tmp_path)
    assert not (tmp_path / "run.json").exists()


def test_run_json_records_environment_and_data_and_a_change_is_refused(tmp_path):
    lines = [json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(40)]
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(lines))
    ev.write_text("\n".join(lines[:8]))
    cfg = _cfg(steps=2, data={"kind": "jsonl", "train_path": str(train), "eval_path": str(ev)})
    work = tmp_path / "w"
    train_and_evaluate(cfg, work)
    recorded = json.loads((work / "run.json").read_text())["recorded"]
    assert recorded["data"][str(train)].startswith("sha256:")
    env = recorded["environment"]
    for k in ("python", "jax", "jaxlib", "flax", "optax", "orbax", "backend", "cpu", "code"):
        assert env[k], k
    (work / "summary.json").unlink()
    train.write_text("\n".join(lines[::-1]))
    with pytest.raises(ValueError, match=r"train data changed since the run started: .*train"
                                         r"\.jsonl"):
        train_and_evaluate(cfg, work)
    allowed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 allow_data_change=True))
    assert train_and_evaluate(allowed, work)["steps"] == 2


# ----------------------------------------------------------------------------- SIGTERM, real processes

ARGS = [sys.executable, "-m", "experiments.train", "--config=configs/lora.py:steps=6",
        "--config.base.source=init", f"--config.model.overrides={TINY_MODEL}",
        "--config.data.n_train_per_task=16", "--config.data.n_eval_per_task=8",
        "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.train.eval_batch_size=16"]
ENV = child_env()


def _launch(workdir, *extra):
    return subprocess.Popen(ARGS + [f"--workdir={workdir}", *extra], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(proc, pattern: str, timeout=180) -> str:
    """Reads ``proc``'s output until a line matches ``pattern``; returns what was read."""
    out = []
    for line in iter(proc.stdout.readline, b""):
        out.append(line.decode())
        if re.search(pattern, out[-1]):
            return "".join(out)
    raise AssertionError(f"{pattern!r} never printed:\n{''.join(out)[-3000:]}")


@pytest.mark.slow
def test_sigterm_at_launch_and_in_the_final_phase_exit_0(tmp_path):
    proc = _launch(tmp_path)
    # During the imports / start-up (no process can catch a signal before its interpreter has
    # run the launcher's first line, a fraction of a second after exec).
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out and not (tmp_path / "summary.json").exists()
    proc = _launch(tmp_path)
    _wait_for(proc, r"^step 6/6")  # the last step is done: final checkpoint, eval, export
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_seconds"] > 0


@pytest.mark.slow
def test_sigterm_mid_save_exits_0_and_the_rerun_completes(tmp_path):
    """Every step is saved in the background; SIGTERM lands while step 3's save is in flight."""
    flags = ("--config.train.checkpoint_every=1", "--config.train.async_checkpoints=True")
    proc = subprocess.Popen([sys.executable, "-m", "tests.train.pause_child", "3", *ARGS[3:],
                             f"--workdir={tmp_path}", *flags], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(proc, r"^paused at step 3")  # step 3's save is in flight; 4-6 wait for the signal
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    stopped = int(re.search(r"SIGTERM: checkpointed step (\d+)", out).group(1))
    proc = _launch(tmp_path, *flags)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0 and f"resuming from step {stopped}" in out, out[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
