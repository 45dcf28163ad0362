"""The pretrained-base cache's lock: two runs that need the same uncached base pretrain it once;
the second waits (saying for whom) and loads the cached base."""

import dataclasses
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import io
from lora_jax.train import Experiment, trainer
from lora_jax.train import workdir as W

TINY = "d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320"


def tiny_pretrain_config(cache_dir) -> Experiment:
    """A 2-layer d=32 GPT-2 whose base is pretrained into ``cache_dir``."""
    cfg = Experiment()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, preset="tiny", overrides=TINY),
        base=dataclasses.replace(cfg.base, source="pretrain", pretrain_steps=3,
                                 pretrain_batch_size=8, cache_dir=str(cache_dir)))


def test_two_runs_needing_one_uncached_base_pretrain_it_once(tmp_path, monkeypatch):
    """The pretraining is a stand-in that writes a real base once the other run waits (so the two
    always contend); the lock, the wait, its log line and the cached load are the trainer's."""
    cfg = tiny_pretrain_config(tmp_path)
    model, _, _ = trainer.build_model(cfg.model, 320)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    init = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, source="init"))
    params = trainer.base_params(init, model, None, example)  # what the stand-in "pretrains"
    lines, waiting, calls = [], threading.Event(), []

    def log(msg):
        lines.append(msg)
        if "waiting for pid" in msg:
            waiting.set()

    def pretrain(pre, workdir):
        calls.append(threading.current_thread().name)
        assert waiting.wait(timeout=30), f"the other run never waited: {lines}"
        io.save_params(workdir / "params", params)
        return {}

    monkeypatch.setattr(trainer, "log", log)
    monkeypatch.setattr(trainer, "train_and_evaluate", pretrain)
    start, out = threading.Barrier(2), {}

    def need_base():
        start.wait()
        out[threading.current_thread().name] = trainer.base_params(cfg, model, None, example)

    threads = [threading.Thread(target=need_base, name=f"run{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1, f"pretrained {len(calls)} times: {lines}"
    waited = [m for m in lines if "waiting for pid" in m]
    assert len(waited) == 1 and f"pid {os.getpid()}" in waited[0], lines
    assert any("pretrained by another process meanwhile" in m for m in lines), lines
    assert len(out) == 2
    for a, b in zip(jax.tree.leaves(out["run0"]), jax.tree.leaves(out["run1"])):
        np.testing.assert_array_equal(a, b)


def test_a_lock_without_wait_still_refuses_and_with_wait_gets_it_after_release(tmp_path):
    with W.WorkdirLock(tmp_path, name="base"):
        with pytest.raises(W.WorkdirBusy, match="in use by pid"):
            with W.WorkdirLock(tmp_path, name="base"):
                pass
        with W.WorkdirLock(tmp_path):  # the run's own lock is another file
            pass
    lines = []
    with W.WorkdirLock(tmp_path, name="base", wait=True, log=lines.append):
        pass
    assert lines == []  # free: no wait, no line
