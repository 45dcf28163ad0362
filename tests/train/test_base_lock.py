"""The pretrained-base cache's lock: two runs that need the same uncached base pretrain it once;
the second waits (saying for whom) and loads the cached base."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.train import Experiment, trainer
from lora_jax.train import workdir as W

TINY = "d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320"


def tiny_pretrain_config(cache_dir) -> Experiment:
    """A base pretrained for 3 steps of a 2-layer d=32 GPT-2 (seconds, mostly compilation)."""
    cfg = Experiment()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, preset="tiny", overrides=TINY),
        base=dataclasses.replace(cfg.base, source="pretrain", pretrain_steps=3,
                                 pretrain_batch_size=8, cache_dir=str(cache_dir)),
        mesh=dataclasses.replace(cfg.mesh, num_devices=1))


def test_two_runs_needing_one_uncached_base_pretrain_it_once(tmp_path, monkeypatch, capsys):
    cfg = tiny_pretrain_config(tmp_path)
    model, _, _ = trainer.build_model(cfg.model, 320)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    calls, real = [], trainer.train_and_evaluate

    def counted(pre, workdir):
        calls.append(workdir)
        return real(pre, workdir)

    monkeypatch.setattr(trainer, "train_and_evaluate", counted)
    start, out = threading.Barrier(2), [None, None]

    def need_base(i):
        start.wait()
        out[i] = trainer.base_params(cfg, model, None, example)

    threads = [threading.Thread(target=need_base, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    log = capsys.readouterr().out
    assert len(calls) == 1, f"pretrained {len(calls)} times: {calls}"
    assert "base model: waiting for pid" in log, log
    assert "pretrained by another process meanwhile" in log, log
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
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
