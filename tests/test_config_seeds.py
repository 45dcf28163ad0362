"""The seed axis of the ablation sweeps (configs/lora.py, rslora.py, methods.py, mtl_lora.py,
adalora.py):
a 'small' sweep is its grid once per adapter seed in ``common.SEEDS``, seeds outermost, with the
base's seed untouched (one cached base serves all); a 'full' grid stays one seed."""

import pytest

from configs import adalora, common, lora, methods, mtl_lora, rslora
from lora_jax.train import Experiment, from_dict, trainer

SEEDED = [(lora, "small"), (rslora, "small"), (rslora, "wide"), (methods, "small"),
          (mtl_lora, "small"), (mtl_lora, "compare"), (adalora, "small")]


@pytest.mark.parametrize("module,arg", SEEDED)
def test_small_sweeps_repeat_their_grid_once_per_seed_seeds_outermost(module, arg):
    points = module.get_sweep(arg)
    assert [p["seed"] for p in points] == sorted(p["seed"] for p in points)  # seeds outermost
    grids = {s: [{k: v for k, v in p.items() if k != "seed"} for p in points if p["seed"] == s]
             for s in common.SEEDS}
    assert set(grids) == {p["seed"] for p in points} and len(common.SEEDS) >= 3
    assert all(g == grids[common.SEEDS[0]] for g in grids.values())
    first = grids[common.SEEDS[0]]
    assert len({repr(sorted(p.items())) for p in first}) == len(first)  # no duplicate point
    assert not any(k.startswith("base.") for p in points for k in p)
    for p in points[:len(first)]:
        cfg = from_dict(Experiment, common.apply_overrides(module.get_config(arg), p).to_dict())
        assert cfg.base.seed == 0 and cfg.seed == p["seed"]


@pytest.mark.parametrize("module", [lora, rslora, methods, mtl_lora])
def test_full_grids_stay_one_seed(module):
    assert not any("seed" in p for p in module.get_sweep(""))


def test_wide_is_the_small_run_on_a_wider_model_up_to_full_rank():
    cfg = from_dict(Experiment, rslora.get_config("wide").to_dict())
    small = from_dict(Experiment, rslora.get_config("small").to_dict())
    assert cfg.train == small.train and cfg.adapter == small.adapter
    trainer.check_model(cfg.model, 256)
    assert "d_model=256" in cfg.model.overrides and max(rslora.WIDE_RANKS) == 256
    assert {p["adapter.rank"] for p in rslora.get_sweep("wide")} == set(rslora.WIDE_RANKS)
    alpha_over_r = from_dict(Experiment, rslora.get_config("wide,rslora=False").to_dict())
    assert not alpha_over_r.adapter.rslora


def test_mtl_sweep_names_set_run_length_and_leave_other_args_alone():
    assert mtl_lora.get_config("small").train.steps == common.SMALL_STEPS
    assert mtl_lora.get_config("compare,method=lora").train.steps == 600
    assert mtl_lora.get_config("compare,method=lora").method == "lora"
    assert {p["method"] for p in mtl_lora.get_sweep("compare")} == set(mtl_lora.METHODS)
    swept = {k for p in mtl_lora.get_sweep("small") for k in p}
    assert {"method_args.temperature", "method_args.num_up", "method_args.diagonal",
            "adapter.rank"} <= swept
    with pytest.raises(ValueError, match="expected key=value"):
        mtl_lora.get_config("tiny")
