"""Sweeps: point names, launch commands, points whose workdir holds another config refused by name,
how a point's exit is classified, and a sweep end to end with a bad point and a crashing point,
interrupted with SIGTERM mid-point and resumed without redoing the finished one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import common
from lora_jax import sweep
from lora_jax.train import Experiment, from_dict
from lora_jax.train.trainer import run_identity
from tests.procs import child_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config.base.source=init",
        "--config.model.overrides=d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320",
        "--config.data.n_train_per_task=16", "--config.data.n_eval_per_task=8",
        "--config.data.seq_len=24", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000",
        "--config.train.eval_batch_size=16"]
ENV = child_env()


def write_config(path: Path, points) -> str:
    path.write_text("from configs import lora\n\n"
                    "def get_config(arg=''):\n    return lora.get_config(arg)\n\n"
                    f"def get_sweep(arg=''):\n    return {points!r}\n")
    return str(path)


def sweep_cmd(config: str, workdir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.sweep", f"--config={config}",
            f"--workdir={workdir}", *TINY, *flags]


# ----------------------------------------------------------------------------- names and commands


def test_point_names_are_readable_and_safe():
    plan = sweep.plan_points([{"adapter.rank": 4, "adapter.targets": "qv"},
                              {"adapter.rank": 16, "adapter.targets": ".*/(q|v)/kernel"},
                              {"optim.lr": 3e-4, "adapter.rslora": True}, {}], "/w")
    assert [p.name for p in plan] == ["rank=4_targets=qv", "rank=16_targets=.-q-v-kernel",
                                      "lr=0.0003_rslora=True", "default"]
    assert plan[0].workdir == Path("/w/rank=4_targets=qv")


def test_shared_leaf_names_keep_their_full_key():
    plan = sweep.plan_points([{"optim.lr": 1e-3, "base.lr": 1}, {"optim.lr": 3e-3, "base.lr": 1}],
                             "/w")
    assert plan[0].name == "optim.lr=0.001_base.lr=1"


def test_points_sharing_a_workdir_are_an_error():
    with pytest.raises(ValueError, match=r"sweep points 0 .* and 1 .* would share the sub-workdir "
                                         r"'targets=a-b'"):
        sweep.plan_points([{"adapter.targets": "a/b"}, {"adapter.targets": "a b"}], "/w")


def test_long_names_are_cut_with_a_hash():
    a, b = sweep.plan_points([{"adapter.targets": "x" * 200 + "1"},
                              {"adapter.targets": "x" * 200 + "2"}], "/w")
    assert len(a.name) <= 120 and a.name != b.name


def test_launch_command():
    point = sweep.Point("rank=4", {"adapter.rank": 4, "adapter.rslora": True}, Path("/w/rank=4"))
    cmd = sweep.format_command(sweep.launch_command("configs/lora.py:small", point,
                                                    ["--config.seed=1"]))
    assert cmd == ("python -m experiments.train --config=configs/lora.py:small "
                   "--workdir=/w/rank=4 --config.seed=1 --config.adapter.rank=4 "
                   "--config.adapter.rslora=True")


def test_print_commands_runs_nothing(tmp_path):
    out = subprocess.run(sweep_cmd("configs/lora.py:small", tmp_path / "w", "--print_commands"),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 27  # 3 ranks x 3 target sets x 3 adapter seeds
    assert lines[0].startswith(f"python -m experiments.train --config=configs/lora.py:small "
                               f"--workdir={tmp_path / 'w' / 'seed=0_rank=1_targets=qv'} "
                               "--config.base.source=init")
    assert lines[0].endswith("--config.seed=0 --config.adapter.rank=1 --config.adapter.targets=qv")
    assert not (tmp_path / "w").exists()


def test_colliding_sweep_fails_before_running_anything(tmp_path):
    config = write_config(tmp_path / "c.py", [{"adapter.targets": "a/b"},
                                              {"adapter.targets": "a b"}])
    proc = subprocess.run(sweep_cmd(config, tmp_path / "w"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "would share the sub-workdir" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_float_values_keep_their_precision():
    assert sweep.format_value(3e-4) == "0.0003" and sweep.format_value(1 / 3) == repr(1 / 3)
    assert float(sweep.format_value(0.1 + 0.2)) == 0.1 + 0.2


@pytest.mark.parametrize("code,summary,stopping,expected", [
    (0, True, False, "done"), (0, False, True, "interrupted"), (0, False, False, "interrupted"),
    (-signal.SIGTERM, False, True, "interrupted"), (-signal.SIGTERM, False, False, "failed"),
    (1, False, True, "failed"), (-signal.SIGKILL, False, True, "failed")])
def test_outcome_of_a_point(code, summary, stopping, expected):
    assert sweep.outcome(code, summary, stopping) == expected


def test_stale_fields_name_what_differs(tmp_path):
    assert sweep.stale_fields(tmp_path, {"train": {"steps": 60}}) == []  # no run.json yet
    (tmp_path / "run.json").write_text(json.dumps(
        {"train": {"steps": 60, "batch_size": 8}, "data": {"tasks": ["a", "b"]},
         "recorded": {"jax": "0.10"}}))
    same = {"train": {"steps": 60, "batch_size": 8}, "data": {"tasks": ("a", "b")}}
    assert sweep.stale_fields(tmp_path, same) == []
    assert sweep.stale_fields(tmp_path, {**same, "train": {"steps": 80, "batch_size": 8},
                                         "seed": 1}) == ["train.steps: 60 on disk, 80 now",
                                                         "seed: absent on disk, 1 now"]
    (tmp_path / "run.json").write_text("")
    assert sweep.stale_fields(tmp_path, same)[0].startswith("run.json unreadable")


def _fake_done_point(workdir: Path, config: str, overrides: dict, flags: list[str]):
    """A point's workdir as a finished run leaves it: run.json exactly as the trainer writes it."""
    cfg = common.load_config(config)
    for flag in flags:
        key, _, value = flag[len("--config."):].partition("=")
        cfg = common.apply_overrides(cfg, {key: value})
    cfg = common.apply_overrides(cfg, overrides)
    workdir.mkdir(parents=True)
    identity = run_identity(from_dict(Experiment, cfg.to_dict()))
    (workdir / "run.json").write_text(json.dumps(identity))
    (workdir / "summary.json").write_text("{}")


def test_a_point_of_another_config_is_refused_not_skipped(tmp_path):
    """The issue's case: the sweep rerun with another shared --config.train.steps."""
    config = write_config(tmp_path / "c.py", [{"adapter.rank": 2}])
    flags = ["--config.base.source=init", "--config.train.steps=60"]
    _fake_done_point(tmp_path / "w" / "rank=2", config, {"adapter.rank": 2}, flags)
    run = lambda *f: subprocess.run([sys.executable, "-m", "experiments.sweep",
                                     f"--config={config}", f"--workdir={tmp_path / 'w'}", *f],
                                    cwd=ROOT, env=ENV, capture_output=True, text=True)
    same = run(*flags)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "[skip] rank=2: complete" in same.stdout
    other = run("--config.base.source=init", "--config.train.steps=80")
    assert other.returncode != 0 and "[skip]" not in other.stdout
    assert ("[fail] rank=2: ValueError: " f"{tmp_path / 'w' / 'rank=2' / 'run.json'} records "
            "another config (train.steps: 60 on disk, 80 now); use a new --workdir") in other.stdout
    assert "sweep: 0 done, 0 already complete, 0 unfinished, 1 failed" in other.stdout


# ----------------------------------------------------------------------------- end to end


def _wait_for_train_step(path: Path, proc, timeout: float = 240):
    """Until ``path`` (metrics.jsonl) has a training step's line: the step-0 eval lines come
    before the loop, and a SIGTERM there stops a run with nothing to checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and '"split": "train"' in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} has no training step (sweep exit code {proc.poll()})")


@pytest.mark.slow
def test_sweep_end_to_end_interrupted_and_resumed(tmp_path):
    """A done point, an unknown override, a point that crashes, and one SIGTERMed mid-run; the
    rerun skips the done point, resumes the interrupted one, and still lists the failures."""
    # The interrupted point runs long enough (thousands of steps at a few hundred a second) that
    # the SIGTERM, sent once it has logged its first step, lands inside its training loop.
    points = [{"adapter.rank": 2, "train.steps": 3},
              {"adapter.rank": 4, "adapter.rnak": 3},
              {"adapter.rank": 4, "adapter.targets": "no/such/kernel"},
              {"adapter.rank": 8, "train.steps": 2000}]
    config = write_config(tmp_path / "c.py", points)
    workdir = tmp_path / "w"
    first, bad, crash, last = (workdir / n for n in (
        "rank=2_steps=3", "rank=4_rnak=3", "rank=4_targets=no-such-kernel", "rank=8_steps=2000"))

    proc = subprocess.Popen(sweep_cmd(config, workdir), cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_train_step(last / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out
    assert ("[fail] rank=4_rnak=3: KeyError: \"override 'adapter.rnak': no such field; did you "
            "mean 'adapter.rank'?\"") in out
    assert f"[fail] rank=4_targets=no-such-kernel: exit code 1; see {crash / 'train.log'}" in out
    assert "[stopped] rank=8_steps=2000: checkpointed" in out  # in the loop, not at start-up
    assert "rank=8_steps=2000: unfinished (rerun to resume)" in out
    assert (first / "summary.json").exists() and not (last / "summary.json").exists()
    assert not bad.exists()
    assert json.loads((last / "overrides.json").read_text())["overrides"] == points[3]
    done_at = (first / "summary.json").stat().st_mtime_ns

    rerun = subprocess.run(sweep_cmd(config, workdir, "--parallel=2"), cwd=ROOT, env=ENV,
                           text=True, capture_output=True)
    assert rerun.returncode != 0
    assert "[skip] rank=2_steps=3: complete" in rerun.stdout
    assert "resume rank=8_steps=2000" in rerun.stdout
    assert "[done] rank=8_steps=2000" in rerun.stdout
    assert "sweep: 1 done, 1 already complete, 0 unfinished, 2 failed" in rerun.stdout
    assert "rank=4_rnak=3" in rerun.stderr and "unfinished" not in rerun.stderr
    assert (first / "summary.json").stat().st_mtime_ns == done_at
    assert "resuming from step" in (last / "train.log").read_text()
    steps = [json.loads(l)["step"] for l in (last / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert steps == list(range(1, 2001))
    assert json.loads((last / "summary.json").read_text())["steps"] == 2000
