"""The workdir's guards: atomic JSON that refuses NaN, one-line errors for torn files, the lock
(held, and stale after SIGKILL), data digests, and the recorded environment."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora_jax import io
from lora_jax.train import workdir as W

ROOT = Path(__file__).resolve().parents[2]


def test_write_json_round_trips_numpy_and_refuses_nan_naming_the_key(tmp_path):
    path = tmp_path / "summary.json"
    W.write_json(path, {"loss": np.float32(0.5), "acc": {"a": np.array([1, 2])}})
    assert json.loads(path.read_text()) == {"loss": 0.5, "acc": {"a": [1, 2]}}
    with pytest.raises(ValueError, match=r"summary.json: accuracy.tasks.1 is not finite"):
        W.write_json(path, {"accuracy": {"tasks": [0.5, float("nan")]}})
    with pytest.raises(ValueError, match="final_train_loss is not finite"):
        W.write_json(path, {"final_train_loss": np.float32("inf")})
    assert json.loads(path.read_text())["loss"] == 0.5  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_kill_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    W.write_json(path, {"v": 1})

    def killed(fd):
        raise KeyboardInterrupt  # stands in for a kill between write and rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        W.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left behind


def test_torn_json_is_a_one_line_error_naming_file_and_fix(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("")
    with pytest.raises(ValueError, match=r"run.json is empty; delete it") as e:
        W.read_json(path, "delete it")
    assert "\n" not in str(e.value)
    path.write_text('{"method": "lo')
    with pytest.raises(ValueError, match=r"run.json is truncated or corrupt \(Unterminated string"):
        W.read_json(path, "delete it")


def test_truncated_adapter_spec_is_a_one_line_error(tmp_path):
    (tmp_path / io.ARRAYS).write_bytes(b"")
    (tmp_path / io.SPEC).write_text('{"adapters": {"a/kernel": {"meth')
    with pytest.raises(ValueError, match=rf"{io.SPEC} is truncated or corrupt .*; export the "
                                         r"adapter again") as e:
        io.load_adapters(tmp_path)
    assert "\n" not in str(e.value)


HOLDER = """
import sys, time
from lora_jax.train.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_lock_held_by_a_live_process_then_recovered_after_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(W.WorkdirBusy) as e:
            with W.WorkdirLock(tmp_path):
                pass
        assert str(e.value) == (f"workdir {tmp_path} is in use by pid {holder.pid} on host "
                                f"{socket.gethostname()}; stop it or use another --workdir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock.0").read_text().split()[0] == str(holder.pid)  # stale file stays
    with W.WorkdirLock(tmp_path) as lock:  # the kernel dropped the dead holder's flock
        assert lock.path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(W.WorkdirBusy):  # a second open in the same process is refused too
            with W.WorkdirLock(tmp_path):
                pass
        with W.WorkdirLock(tmp_path, process_index=1):  # each process has its own lock
            pass
    with W.WorkdirLock(tmp_path):  # released on exit
        pass


def test_data_digests_catch_a_changed_file(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n' * 1000)
    recorded = W.data_digests([data])
    assert recorded[str(data)] == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    assert W.file_digest(data, chunk=7) == recorded[str(data)]  # streamed in pieces
    assert W.check_data_unchanged(recorded) == []
    data.write_text('{"text": "b"}\n' * 1000)
    with pytest.raises(ValueError, match=rf"^train data changed since the run started: "
                                         rf"{data} \(sha256:.*; pass "
                                         r"--config.train.allow_data_change=True to continue$"):
        W.check_data_unchanged(recorded)
    lines = W.check_data_unchanged(recorded, allow_change=True)
    assert len(lines) == 1 and str(data) in lines[0]
    data.unlink()
    with pytest.raises(ValueError, match="missing… now"):
        W.check_data_unchanged(recorded)


def test_environment_names_code_libraries_and_machine():
    env = W.environment()
    for key in ("python", "jax", "jaxlib", "flax", "optax", "orbax", "backend", "devices", "cpu"):
        assert env[key], key
    assert env["backend"] == "cpu" and env["devices"].startswith("8 x ")
    code = env["code"]
    assert code["version"] and len(code["git_commit"] or "") == 40  # tests run in a checkout
    assert isinstance(code["git_dirty"], bool)
    json.dumps(env)
