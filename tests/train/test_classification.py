"""Classification data kinds through the trainer: sentence pairs on BERT and digits on a ViT train
end to end (loss falls, summary.json has per-task accuracy), and their errors name the fix."""

import dataclasses
import json

import numpy as np
import pytest

from lora_jax import data as D
from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer
from lora_jax.train.steps import objective_for
from tests.train.test_trainer import load_config, tiny


def _cfg(name: str, method: str = "lora", steps: int = 8) -> Experiment:
    """The config on its tiny preset, each step on the whole (tiny) train set, no warm-up."""
    cfg = tiny(from_dict(Experiment, load_config(name, f"method={method}").to_dict()), steps)
    rows = cfg.data.n_train_per_task * len(cfg.data.tasks)
    return dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2, warmup_steps=1),
        train=dataclasses.replace(cfg.train, batch_size=rows))


def _train_losses(workdir) -> list[float]:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("name, method, tasks", [
    ("bert_lora", "lora", ["paraphrase"]),
    ("vit_lora", "full", ["plain_5to9", "rot90_0to4", "shift_0to4", "invert_0to4"]),
])
def test_classification_kind_trains_and_reports_accuracy(name, method, tasks, tmp_path):
    """One run per kind (LoRA on one, full fine-tuning on the other; test_trainer runs one LoRA
    step of each config): 30 full-batch steps cut the loss by a quarter at least."""
    summary = train_and_evaluate(_cfg(name, method, steps=30), tmp_path)
    losses = _train_losses(tmp_path)
    assert len(losses) == 30 and losses[-1] < 0.75 * losses[0], losses
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for key in ("accuracy", "base_accuracy"):
        assert list(summary[key]) == tasks + ["mean"]
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean([summary["accuracy"][t]
                                                                 for t in tasks]))
    assert summary["method"] == method
    if method == "full":
        assert summary["trainable_params"] == summary["total_params"]
        assert (tmp_path / "params").is_dir()
    else:
        assert 0 < summary["trainable_params"] < summary["total_params"]
        assert (tmp_path / "adapter" / "adapters.msgpack").exists()


@pytest.mark.parametrize("kind, keys", [
    ("sentences", {"tokens", "token_types", "mask", "labels", "task_ids"}),
    ("images", {"images", "labels", "task_ids"}),
])
def test_a_kind_loads_what_its_objective_reads(kind, keys):
    dc = _cfg({"sentences": "bert_lora", "images": "vit_lora"}[kind]).data
    k = D.get_kind(kind)
    train, evals, tasks = k.load(dc, k.tokenizer(dc))
    assert set(train) == set(evals) == keys
    assert set(objective_for(kind).inputs) <= keys
    assert len(train["labels"]) == dc.n_train_per_task * len(tasks)
    assert k.example(dc).shape[1:] == train[k.inputs[0]].shape[1:]


def test_an_encoder_without_a_classifier_head_is_an_error_that_names_it(tmp_path):
    cfg = _cfg("bert_lora", "full", steps=1)  # (LoRA would first miss its 'classifier' head)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, overrides=""))
    with pytest.raises(ValueError, match="head=sequence"):
        train_and_evaluate(cfg, tmp_path)


def test_an_image_model_on_token_data_is_refused_before_the_workdir(tmp_path):
    cfg = _cfg("vit_lora", steps=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, kind="tasks", tasks=("digits_reverse",)))
    with pytest.raises(ValueError, match="model 'vit' reads no tokens"):
        train_and_evaluate(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_evaluate_counts_each_example_once_when_the_last_batch_wraps_around():
    """5 rows in batches of 4: the second batch is padded by wrapping around (rows 4, 0, 1, 2);
    only row 4 of it may count, for the loss as for the accuracy."""
    from lora_jax.train.steps import evaluate

    arrays = {"x": np.arange(5.0), "task_ids": np.array([0, 0, 0, 1, 1], np.int32)}
    step = lambda t, f, b: (b["x"], np.ones_like(b["x"]), b["x"] % 2 == 0)  # scores per row
    out = evaluate(step, None, None, D.EvalLoader(arrays, 4), ("a", "b"))
    assert out["loss"] == pytest.approx(2.0)  # mean of 0..4
    assert out["accuracy"] == {"a": pytest.approx(2 / 3), "b": 0.5,
                               "mean": pytest.approx((2 / 3 + 0.5) / 2)}


def test_a_base_is_pretrained_on_built_in_tasks_with_the_same_objective():
    for name, kind in D.KINDS.items():
        pre = D.get_kind(D.pretrain_kind(name))
        assert pre.objective == kind.objective and pre.files(None) == [], name
    assert D.pretrain_kind("jsonl") == "tasks" and D.pretrain_kind("images") == "images"
