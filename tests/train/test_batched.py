"""Batched sweeps (lora_jax/train/batched.py): a group's per-point losses equal the solo runs', the
workdirs hold what solo runs write, grouping says why a point trains solo, a diverged point stops
alone, an interrupted group resumes exactly."""

import dataclasses
import json

import numpy as np
import pytest

from lora_jax.train import Experiment, train_and_evaluate
from lora_jax.train import batched, trainer
from lora_jax.train.config import AdapterConfig, OptimConfig
from tests.train.test_trainer import tiny

# 4 points differing in rank, alpha/rsLoRA, learning rate, schedule and seed.
POINTS = [dict(rank=2, lr=3e-3, seed=0), dict(rank=8, lr=1e-2, seed=1),
          dict(rank=4, lr=1e-3, seed=2, rslora=True), dict(rank=8, lr=3e-3, seed=0, wd=0.1)]


def point(rank, lr, seed, rslora=False, wd=0.0, steps=4) -> Experiment:
    cfg = tiny(Experiment(), steps=steps)
    model = dataclasses.replace(cfg.model, overrides=cfg.model.overrides + ",n_layers=1")
    return dataclasses.replace(
        cfg, seed=seed, model=model,
        adapter=AdapterConfig(rank=rank, alpha=2.0 * rank, targets="qv", rslora=rslora),
        optim=OptimConfig(lr=lr, weight_decay=wd, warmup_steps=2),
        train=dataclasses.replace(cfg.train, log_every=1, eval_every=2 if steps > 3 else 1000))


def records(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow  # 4 solo runs + the group: ~40 s on 2 loaded cores (compilation)
def test_group_losses_equal_solo_runs_and_resume_exactly(tmp_path, monkeypatch):
    """The group is interrupted (SIGTERM's flag) before step 3 and resumed from its checkpoint."""
    cfgs = [point(**p) for p in POINTS]
    groups, solo = batched.plan_groups(cfgs)
    assert groups == [[0, 1, 2, 3]] and solo == {}
    dirs = [tmp_path / f"b{i}" for i in range(4)]
    with monkeypatch.context() as m:
        m.setattr(trainer.PREEMPTION, "should_stop", lambda step: step == 3)
        assert batched.train_group(cfgs, dirs) == [{"interrupted": True, "step": 2}] * 4
    assert all((d / "checkpoints").is_dir() and not (d / "summary.json").exists() for d in dirs)
    logs = []
    out = batched.train_group(cfgs, dirs, log=logs.append)
    assert "batched group: resuming from step 2" in logs
    for i, cfg in enumerate(cfgs):
        ref = train_and_evaluate(cfg, tmp_path / f"s{i}")
        b, s = tmp_path / f"b{i}", tmp_path / f"s{i}"
        tb, ts = records(b, "train"), records(s, "train")
        assert [r["step"] for r in tb] == [r["step"] for r in ts] == [1, 2, 3, 4]
        np.testing.assert_allclose([r["loss"] for r in tb], [r["loss"] for r in ts], rtol=0,
                                   atol=1e-5, err_msg=f"point {i}")
        np.testing.assert_allclose([r["lr"] for r in tb], [r["lr"] for r in ts], rtol=1e-7)
        eb, es = records(b, "eval"), records(s, "eval")
        assert [r["step"] for r in eb] == [r["step"] for r in es] == [0, 2, 4]
        np.testing.assert_allclose([r["loss"] for r in eb], [r["loss"] for r in es], atol=1e-5)
        assert out[i]["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-5)
        assert out[i]["trainable_params"] == ref["trainable_params"]
        assert set(ref) <= set(out[i])
        for name in ("run.json", "base_eval.json", "adapter", "summary.json"):
            assert (b / name).exists(), name
        assert json.loads((b / "run.json").read_text())["adapter"] == \
            json.loads((s / "run.json").read_text())["adapter"]
    # the points really differ, so equality above is not trivial
    assert len({round(o["final_train_loss"], 6) for o in out}) == 4


def test_plan_groups_says_why_points_train_solo():
    base = point(rank=4, lr=1e-3, seed=0)
    cfgs = [base, dataclasses.replace(base, seed=1),
            dataclasses.replace(base, method="dora"),
            dataclasses.replace(base, adapter=dataclasses.replace(base.adapter, targets="all-linear")),
            dataclasses.replace(base, method_args={"init_weights": "pissa"}),
            dataclasses.replace(base, adapter=dataclasses.replace(base.adapter, dropout=0.1)),
            dataclasses.replace(base, data=dataclasses.replace(base.data, kind="images"))]
    groups, solo = batched.plan_groups(cfgs)
    assert groups == [[0, 1]]
    assert "method 'dora'" in solo[2] and "no other point shares" in solo[3]
    assert "PiSSA" in solo[4] and "dropout" in solo[5] and "token loss" in solo[6]
    with pytest.raises(ValueError, match="adapter.targets"):
        batched.train_group([cfgs[0], cfgs[3]], ["a", "b"])


def test_diverged_point_stops_alone(tmp_path):
    cfgs = [point(rank=4, lr=1e-3, seed=0, steps=3), point(rank=4, lr=float("nan"), seed=1, steps=3)]
    out = batched.train_group(cfgs, [tmp_path / "ok", tmp_path / "nan"])
    assert out[1]["diverged"] and "step 1" in out[1]["reason"]
    assert (tmp_path / "nan" / "diverged.json").exists()
    assert not (tmp_path / "nan" / "summary.json").exists()
    assert np.isfinite(out[0]["final_train_loss"]) and out[0]["steps"] == 3
