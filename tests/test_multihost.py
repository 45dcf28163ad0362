"""Multi-host training for real: 2 processes of 4 CPU devices each, talking over loopback (gloo),
give the same losses as 1 process of 8 devices; checkpoints move between the two; an unreachable
coordinator fails fast with a clear message. Every test starts fresh Python processes."""

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_jax import io

from tests.procs import child_env
from tests.train import train_child

ROOT = Path(__file__).resolve().parents[1]
TINY = "d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320"
ARGS = ["--config=configs/lora.py", "--config.base.source=init",
        f"--config.model.overrides={TINY}", "--config.mesh.preset=fsdp_tp",
        "--config.data.n_train_per_task=32", "--config.data.n_eval_per_task=5",
        "--config.data.seq_len=24", "--config.train.batch_size=8", "--config.train.steps=6",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=3", "--config.train.eval_every=1000",
        "--config.train.eval_batch_size=4"]  # 10 eval rows: 5 per process, 3 batches of 2 each
RTOL = 1e-5  # as tests/test_sharding.py: only the order of cross-device reductions differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return child_env(devices)


def launch(workdir, processes: int, extra=()) -> tuple[list, list]:
    """Starts experiments.train in ``processes`` processes (8 devices in all), forked from a
    forkserver that imported the modules once (``tests/train/train_child.py``); returns the
    processes and their log files."""
    args = [f"--workdir={workdir}", *ARGS, *extra]
    if processes == 1:
        runs = [(args, _env(8))]
    else:
        address = f"127.0.0.1:{_free_port()}"
        runs = [(args + [f"--config.mesh.coordinator_address={address}",
                         f"--config.mesh.num_processes={processes}",
                         f"--config.mesh.process_id={i}", "--config.mesh.init_timeout_s=120"],
                 _env(8 // processes)) for i in range(processes)]
    logs = [Path(f"{workdir}.{time.time_ns()}.{i}.log") for i in range(processes)]
    return [train_child.start(a, env, log) for (a, env), log in zip(runs, logs)], logs


def finish(procs, logs, timeout=600) -> list[str]:
    """Waits for ``launch``'s processes; asserts each exited 0; returns their outputs."""
    for proc in procs:
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
    outs = [log.read_text() if log.exists() else "" for log in logs]
    for proc, out in zip(procs, outs):
        assert proc.exitcode == 0, f"exit code {proc.exitcode}\n{out[-4000:]}"
    return outs


def _train(workdir, processes: int, extra=()) -> list[str]:
    return finish(*launch(workdir, processes, extra))


def _losses(workdir) -> dict:
    rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _assert_same_evals(workdir, reference, err_msg="") -> None:
    """The base and final eval numbers of ``summary.json`` match ``reference``'s."""
    got, want = (json.loads((Path(d) / "summary.json").read_text()) for d in (workdir, reference))
    np.testing.assert_allclose([got["base_eval_loss"], got["final_eval_loss"]],
                               [want["base_eval_loss"], want["final_eval_loss"]], rtol=RTOL,
                               err_msg=err_msg)
    assert (got["base_accuracy"], got["accuracy"]) == (want["base_accuracy"], want["accuracy"])


def _resume_copy(src, dst, step: int):
    """A workdir holding only ``src``'s checkpoint ``step`` (and its run identity)."""
    dst.mkdir()
    for name in ("run.json", "base_eval.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "checkpoints" / str(step), dst / "checkpoints" / str(step))


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_move_between_them(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # A pretrained base: the 1-process run pretrains it into the cache, every later run (2
    # processes included) reads the cached base, each process only its shards.
    base = ("--config.base.source=pretrain", "--config.base.pretrain_steps=4",
            "--config.base.pretrain_batch_size=8", f"--config.base.cache_dir={tmp_path / 'cache'}")
    out_one = _train(one, 1, base)[0]
    outs_two = _train(two, 2, base)
    assert "over 1 process(es)" in out_one and all("over 2 process(es)" in o for o in outs_two)
    assert "base model: pretraining" in out_one
    assert all("base model: cached at" in o for o in outs_two)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4, 5, 6]  # process 0 alone writes metrics
    np.testing.assert_allclose([l2[s] for s in l1], list(l1.values()), rtol=RTOL)
    # The export (adapters gathered from both processes' shards) equals 1 process's.
    (a1, _), (a2, _) = (io.load_adapters(d / "adapter") for d in (one, two))
    leaves1, leaves2 = jax.tree.leaves(a1), jax.tree.leaves(a2)
    assert len(leaves1) == len(leaves2) > 0
    for x1, x2 in zip(leaves1, leaves2):
        np.testing.assert_allclose(x2, x1, rtol=RTOL, atol=1e-7)
    _assert_same_evals(two, one)  # each process scored its half of the eval rows

    # 2-process checkpoint -> 1-process run, and 1-process checkpoint -> 2-process run.
    _resume_copy(two, tmp_path / "two_to_one", 3)
    _train(tmp_path / "two_to_one", 1, base)
    _resume_copy(one, tmp_path / "one_to_two", 3)
    _train(tmp_path / "one_to_two", 2, base)
    for d in ("two_to_one", "one_to_two"):
        resumed = _losses(tmp_path / d)
        assert sorted(resumed) == [4, 5, 6], d
        np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [l1[s] for s in (4, 5, 6)],
                                   rtol=RTOL, err_msg=d)
        _assert_same_evals(tmp_path / d, one, d)


@pytest.mark.slow
def test_unreachable_coordinator_times_out_with_a_clear_message(tmp_path):
    port = _free_port()  # nothing listens there
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *ARGS,
           f"--config.mesh.coordinator_address=127.0.0.1:{port}",
           "--config.mesh.num_processes=2", "--config.mesh.process_id=1",
           "--config.mesh.init_timeout_s=5"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(4), capture_output=True, timeout=240)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode != 0
    assert f"the JAX coordinator at 127.0.0.1:{port} was not reachable within 5s" in out, out
    assert time.time() - t0 < 200
