"""The MTL-LoRA experiment (configs/mtl_lora.py): every method trains a step on a tiny model, the
per-task merged exports reproduce the routed model, and the stated parameter budgets hold."""

import dataclasses
import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from configs import common, mtl_lora
from lora_jax import io, models
from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer

sys.path.insert(0, str(Path(__file__).parent / "train"))
tiny = importlib.import_module("test_trainer").tiny


def _cfg(arg: str, **method_args) -> Experiment:
    cfg = from_dict(Experiment, mtl_lora.get_config(arg).to_dict())
    return dataclasses.replace(cfg, method_args={**cfg.method_args, **method_args})


@pytest.mark.parametrize("method", mtl_lora.METHODS)
def test_each_method_trains_a_step_on_a_tiny_model(method, tmp_path):
    summary = train_and_evaluate(tiny(_cfg(f"method={method}"), steps=1), tmp_path)
    assert summary["method"] == method and summary["steps"] == 1
    assert set(summary["accuracy"]) == set(mtl_lora.TASKS) | {"mean"}
    assert np.isfinite(summary["final_eval_loss"])
    adapters, meta = io.load_adapters(tmp_path / "adapter")
    assert {a.method for a in lj.rules.flatten(adapters).values()} == {
        trainer.build_method(_cfg(f"method={method}"))}
    assert meta["method"] == method


def test_merged_exports_reproduce_the_routed_model(tmp_path):
    cfg = tiny(_cfg("method=mtl", export_merged=True), steps=2)
    train_and_evaluate(cfg, tmp_path)
    model, _, _ = trainer.build_model(cfg.model, trainer.D.get_tokenizer("byte").vocab_size)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = trainer.base_params(cfg, model, None, example)
    adapters, _ = io.load_adapters(tmp_path / "adapter", params)
    x = jax.random.randint(jax.random.key(0), (2, cfg.data.seq_len), 0, 256)
    for t, name in enumerate(cfg.data.tasks):
        merged = io.load_params(tmp_path / "merged" / name)
        routed = lj.apply(model, params, adapters, x, task_ids=jnp.full((2,), t))
        np.testing.assert_allclose(model.apply({"params": merged}, x), routed, atol=1e-4)


def test_matched_budgets_are_as_stated():
    model, _ = models.get_model("gpt2", "tiny")
    x = jnp.zeros((1, 32), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), lj.transform._unbox(shapes))
    layouts = lj.trace_layouts(model, params, x)
    stated = {"lora": 131_072, "per_task": 131_072, "mtl": 143_552, "multilora": 136_704}
    for method, want in stated.items():
        cfg = _cfg(f"method={method}")
        spec = trainer.adapter_spec(cfg)
        adapters = lj.init_adapters(params, spec, jax.random.key(0), layouts=layouts)
        assert lj.count_params(adapters) == want, method
        assert f"{want:,}" in mtl_lora.__doc__


def test_every_sweep_point_builds_a_spec():
    points = mtl_lora.get_sweep("")
    assert {p["method"] for p in points} == set(mtl_lora.METHODS)
    swept = {k for p in points for k in p}
    assert {"method_args.temperature", "method_args.num_up", "method_args.diagonal",
            "adapter.rank"} <= swept
    for p in points:
        cfg = from_dict(Experiment, common.apply_overrides(mtl_lora.get_config(""), p).to_dict())
        assert trainer.adapter_spec(cfg).method.name == p["method"]
    with pytest.raises(ValueError, match="method='dora'"):
        mtl_lora.get_config("method=dora")
