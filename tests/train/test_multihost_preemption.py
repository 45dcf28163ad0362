"""Multi-host preemption: SIGTERM to one of 2 processes stops both at the same step (JAX's
preemption sync point), with exit 0, and a rerun of both completes the run."""

import re
import time

import pytest

from tests.test_multihost import _losses, finish, launch


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    extra = ["--config.train.steps=40", "--config.train.checkpoint_every=1000"]
    procs, logs = launch(tmp_path, 2, extra)
    deadline = time.time() + 300
    while not (logs[1].exists() and re.search(r"^step 3/", logs[1].read_text(), re.M)):
        assert time.time() < deadline and procs[1].exitcode is None, "process 1 did not reach step 3"
        time.sleep(0.05)
    procs[1].terminate()  # SIGTERM, to process 1 only
    outs = finish(procs, logs, timeout=300)
    stops = [int(re.search(r"SIGTERM: checkpointed step (\d+)", out).group(1)) for out in outs]
    assert stops[0] == stops[1] >= 3
    for out in finish(*launch(tmp_path, 2, extra)):
        assert f"resuming from step {stops[0]}" in out
    assert sorted(_losses(tmp_path))[-1] == 40
