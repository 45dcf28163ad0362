"""``experiments.sweep --batched``'s plumbing (lora_jax.sweep.run_groups): skips complete points,
fails a diverged point alone and a crashing group as a whole, writes each point's overrides.json.
(The batched training itself: tests/train/test_batched.py.)"""

import json

from lora_jax import sweep


def test_run_groups_outcomes(tmp_path):
    plan = sweep.plan_points([{"adapter.rank": r} for r in (2, 4, 8, 16, 32)], tmp_path)
    (plan[0].workdir).mkdir()
    (plan[0].workdir / "summary.json").write_text("{}")
    calls = []

    def train_group(idx):
        calls.append(list(idx))
        if 3 in idx:
            raise RuntimeError("boom")
        return [{"diverged": True, "reason": "step 2: non-finite"} if i == 2 else
                {"interrupted": True, "step": 3} if i == 4 else {"steps": 1} for i in idx]

    logs = []
    result = sweep.run_groups("cfg.py", plan, [[0, 1, 2], [3], [4]], train_group,
                              log=logs.append)
    assert calls == [[1, 2], [3], [4]]  # the complete point 0 is not retrained
    assert result.skipped == [plan[0].name] and result.done == [plan[1].name]
    assert result.failed[plan[2].name] == "step 2: non-finite"
    assert "boom" in result.failed[plan[3].name] and result.interrupted == [plan[4].name]
    assert json.loads((plan[1].workdir / "overrides.json").read_text())["overrides"] == \
        {"adapter.rank": 4}
    assert any(line.startswith("[group 1/3] 2 points") for line in logs)


def test_run_groups_refuses_a_point_of_another_config(tmp_path):
    plan = sweep.plan_points([{"adapter.rank": 2}, {"adapter.rank": 4}], tmp_path)
    plan[0].workdir.mkdir()
    (plan[0].workdir / "run.json").write_text(json.dumps({"train": {"steps": 60}}))
    seen = []
    result = sweep.run_groups("cfg.py", plan, [[0, 1]], lambda idx: seen.append(idx) or
                              [{"steps": 1} for _ in idx],
                              identity=lambda o: {"train": {"steps": 80}}, log=lambda m: None)
    assert "train.steps: 60 on disk, 80 now" in result.failed[plan[0].name]
    assert seen == [[1]] and result.done == [plan[1].name]
