"""The encoder configs' other rows through the trainer: a linear probe (``method=probe``: the head
alone), MTL-LoRA with the image variant as the task id (``method=mtl``), a Hugging Face BERT
checkpoint with its head chosen by ``model.overrides``, and honest throughput keys per kind."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from lora_jax import io
from lora_jax.train import trainer
from tests.models.test_bert import HF, hf_weights, write_checkpoint
from tests.train.test_classification import _cfg, _train_losses

TASKS = ["plain_5to9", "rot90_0to4", "shift_0to4", "invert_0to4"]


def test_probe_trains_only_the_head_and_images_report_examples_per_sec(tmp_path):
    cfg = _cfg("vit_lora", "probe", steps=20)
    assert cfg.method == "saved" and cfg.adapter.targets == ""
    summary = trainer.train_and_evaluate(cfg, tmp_path)
    d = 32  # the tiny ViT's width
    assert summary["trainable_params"] == d * 10 + 10  # head kernel (d, 10) + bias
    adapters = io.load_adapters(tmp_path / "adapter")[0]
    assert sorted(adapters) == ["head"], sorted(adapters)
    losses = _train_losses(tmp_path)  # random-init features: the head alone learns slowly
    assert losses[-1] < 0.95 * losses[0], losses
    # Images are not tokens: examples/s only (batch_size rows per step).
    assert "tokens_per_sec" not in summary and summary["examples_per_sec"] > 0
    assert summary["examples_per_sec"] == pytest.approx(
        cfg.train.batch_size * summary["steps"] / summary["train_seconds"])


def test_mtl_lora_takes_the_variant_as_the_task_id(tmp_path):
    """``vit_lora.py:method=mtl`` is the whole change: num_tasks is the data's task count, and
    each variant trains its own Λ_t (the rows of a task not in the batch get no gradient)."""
    cfg = _cfg("vit_lora", "mtl", steps=8)
    assert cfg.method == "mtl" and cfg.method_args["num_tasks"] == len(TASKS)
    summary = trainer.train_and_evaluate(cfg, tmp_path)
    losses = _train_losses(tmp_path)
    assert losses[-1] < 0.75 * losses[0], losses
    assert list(summary["accuracy"]) == TASKS + ["mean"]
    adapters = jax.tree.leaves(io.load_adapters(tmp_path / "adapter")[0],
                               is_leaf=lambda x: hasattr(x, "method"))
    mtl = [a for a in adapters if getattr(a.method, "name", "") == "mtl"]
    assert mtl and all(a.method.num_tasks == len(TASKS) for a in mtl)
    lam = np.asarray(mtl[0].params["lam"])  # (T, r, r), initialised to I
    moved = [np.abs(lam[t] - np.eye(lam.shape[-1])).max() for t in range(len(TASKS))]
    assert all(m > 0 for m in moved), moved  # every variant's Λ_t trained


@pytest.fixture
def bert_dir(tmp_path):
    """A tiny HF BERT (BertModel names, a pooler, no classifier) whose vocab covers the
    templates' WordPiece ids (90) and whose positions cover data.seq_len (24)."""
    hf = dict(HF, vocab_size=96, max_position_embeddings=32)
    weights = hf_weights(hf, seed=3)
    return write_checkpoint(tmp_path / "hf", weights, hf), weights


def _hf_cfg(path, method="lora", steps=6):
    cfg = _cfg("bert_lora", method, steps=steps)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=path),
                               base=dataclasses.replace(cfg.base, source="hf"))


def test_a_hf_bert_checkpoint_trains_with_the_configs_head(bert_dir, tmp_path):
    path, weights = bert_dir
    cfg = _hf_cfg(path, steps=8)
    trainer.validate(cfg)  # check_model reads config.json: 'bert' is known
    model, model_cfg, params = trainer.build_model(cfg.model, 90)
    assert (model_cfg.head, model_cfg.n_labels, model_cfg.pooling) == ("sequence", 2, "mean")
    assert params["classifier"]["kernel"].shape == (HF["hidden_size"], 2)
    np.testing.assert_array_equal(params["bert"]["word_embeddings"]["embedding"],
                                  weights["embeddings.word_embeddings.weight"])
    summary = trainer.train_and_evaluate(cfg, tmp_path / "run")
    assert summary["model"] == path and summary["steps"] == 8
    losses = _train_losses(tmp_path / "run")
    assert losses[-1] < 0.9 * losses[0], losses
    n_base = sum(x.size for x in jax.tree.leaves(params))
    assert summary["total_params"] == n_base + summary["trainable_params"]
    # Sentences are tokens: both throughputs, tokens = examples x seq_len.
    assert summary["tokens_per_sec"] == pytest.approx(
        summary["examples_per_sec"] * cfg.data.seq_len)


def test_a_hf_bert_override_of_a_checkpoint_field_is_refused(bert_dir, tmp_path):
    cfg = _hf_cfg(bert_dir[0])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, overrides=cfg.model.overrides + ",d_model=64"))
    with pytest.raises(ValueError, match=r"\['d_model'\] are set by the checkpoint"):
        trainer.train_and_evaluate(cfg, tmp_path / "run")
