"""The Hugging Face route of the trainer (``base.source='hf'``, ``model.hf_path=DIR``): tiny
HF-format GPT-2 and Llama checkpoints (safetensors + config.json, written here by the helpers of
tests/models/test_hf.py) train 2 steps through ``train_and_evaluate``."""

import dataclasses

import numpy as np
import pytest

from lora_jax.train import Experiment, from_dict, train_and_evaluate
from tests.models.test_hf import GPT2_HF, LLAMA_HF, gpt2_weights, llama_weights, write_checkpoint
from tests.train.test_trainer import load_config, tiny

VOCAB = 320  # >= the byte tokenizer's vocabulary
CHECKPOINTS = {
    "gpt2": (dict(GPT2_HF, vocab_size=VOCAB, n_positions=32), gpt2_weights),
    "llama": (dict(LLAMA_HF, vocab_size=VOCAB, max_position_embeddings=32), llama_weights),
}


@pytest.mark.parametrize("family", sorted(CHECKPOINTS))
def test_hf_checkpoint_trains_through_train_and_evaluate(family, tmp_path):
    hf_config, weights = CHECKPOINTS[family]
    write_checkpoint(tmp_path / "hf", hf_config, weights(hf_config))
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=2)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, family=family, hf_path=str(tmp_path / "hf")),
        base=dataclasses.replace(cfg.base, source="hf"),
        adapter=dataclasses.replace(cfg.adapter, rank=4))
    summary = train_and_evaluate(cfg, tmp_path / "run")
    assert summary["steps"] == 2 and summary["model"] == str(tmp_path / "hf")
    assert np.isfinite(summary["final_eval_loss"]) and summary["trainable_params"] > 0
    assert (tmp_path / "run" / "adapter" / "adapters.msgpack").exists()


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_the_workdir(tmp_path):
    hf_config, weights = CHECKPOINTS["gpt2"]
    small = dict(hf_config, vocab_size=48)
    write_checkpoint(tmp_path / "hf", small, weights(small))
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=2)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, hf_path=str(tmp_path / "hf")),
        base=dataclasses.replace(cfg.base, source="hf"))
    with pytest.raises(ValueError, match="model vocab_size 48 < the tokenizer's"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
