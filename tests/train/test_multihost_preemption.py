"""Multi-host preemption: SIGTERM to one of 2 processes stops both at the same step (JAX's
preemption sync point), with exit 0, and a rerun of both completes the run."""

import re
import signal
import subprocess
import sys

import pytest

from tests.test_multihost import ARGS, ROOT, _env, _free_port, _losses


def _launch(workdir, address, steps):
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *ARGS,
           f"--config.train.steps={steps}", "--config.train.checkpoint_every=1000",
           f"--config.mesh.coordinator_address={address}", "--config.mesh.num_processes=2",
           "--config.mesh.init_timeout_s=120"]
    return [subprocess.Popen(cmd + [f"--config.mesh.process_id={i}"], cwd=ROOT, env=_env(4),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    procs = _launch(tmp_path, f"127.0.0.1:{_free_port()}", steps=40)
    seen = []
    for line in iter(procs[1].stdout.readline, b""):
        seen.append(line.decode())
        if re.match(r"step 3/", seen[-1]):
            break
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    outs[1] = "".join(seen) + outs[1]
    stops = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        stops.append(int(re.search(r"SIGTERM: checkpointed step (\d+)", out).group(1)))
    assert stops[0] == stops[1] >= 3
    procs = _launch(tmp_path, f"127.0.0.1:{_free_port()}", steps=40)
    for p in procs:
        out = p.communicate(timeout=600)[0].decode()
        assert p.returncode == 0, out[-3000:]
        assert f"resuming from step {stops[0]}" in out
    assert sorted(_losses(tmp_path))[-1] == 40
