"""experiments.reproduce's table and band on made-up runs (no training), its configs, and the
README's results table as the rendering of the committed docs/results/default.json."""

import json
from pathlib import Path

import pytest

from experiments import reproduce as R

ROOT = Path(__file__).resolve().parents[1]
ENV = {"cpu": "AMD EPYC", "jax": "0.10.2", "backend": "cpu", "devices": "1 x cpu",
       "git_commit": "5ea5208abc"}


def fake_run(name, seed, dr, kv, loss, params=65536):
    return {"name": name, "seed": seed, "trainable_params": params, "digits_reverse": dr,
            "kv_recall": kv, "mean": (dr + kv) / 2, "eval_loss": loss, "environment": ENV,
            "base_eval_loss": 4.8 + seed / 10, "base_accuracy": 0.0}


RUNS = [fake_run("lora", 0, 0.80, 0.40, 0.36), fake_run("lora", 1, 0.86, 0.36, 0.40),
        fake_run("lora", 2, 0.83, 0.38, 0.38),
        fake_run("full_ft", 0, 0.97, 0.42, 0.19, params=875264)]


def test_mean_and_sample_std_per_row_in_rows_order():
    agg = R.aggregate(RUNS)
    assert list(agg) == ["lora", "full_ft"]  # ROWS order, not input order
    mean, std = agg["lora"]["digits_reverse"]
    assert mean == pytest.approx(0.83) and std == pytest.approx(0.03)  # ddof=1
    assert agg["lora"]["n"] == 3 and agg["full_ft"]["digits_reverse"] == (0.97, 0.0)


def test_table_names_seed_counts_only_when_rows_differ():
    table = R.markdown_table(R.aggregate(RUNS))
    lines = table.splitlines()
    assert lines[0].startswith("| config | trainable params | digits_reverse")
    assert "| `configs/lora.py` (r=8, all-linear) (3 seeds) | 65,536 | 0.830 ± 0.030 |" in lines[2]
    assert "(1 seed) | 875,264 | 0.970 ± 0.000" in lines[3]
    same = R.markdown_table(R.aggregate(RUNS[:3]))
    assert "seeds)" not in same


def test_band_is_three_std_with_a_floor_and_the_comparison_flags_outliers():
    agg = R.aggregate(RUNS)["lora"]
    assert R.band(agg, "digits_reverse") == pytest.approx((0.83 - 0.09, 0.83 + 0.09))
    lo, hi = R.band(agg, "kv_recall")  # std 0.02: 3·std 0.06 > floor 0.03
    assert (lo, hi) == pytest.approx((0.32, 0.44))
    assert R.band(agg, "trainable_params") == (65536, 65536)
    inside = R.compare(fake_run("lora", 3, 0.88, 0.37, 0.39), agg)
    assert all(ok for *_, ok in inside), R.format_comparison(inside)
    outside = R.compare(fake_run("lora", 3, 0.60, 0.40, 0.39, params=1), agg)
    assert [m for m, *_, ok in outside if not ok] == ["trainable_params", "digits_reverse",
                                                      "mean"]
    assert "OUTSIDE" in R.format_comparison(outside)
    flat = {**agg, "eval_loss": (0.38, 0.001)}  # a tiny std: the floor decides
    assert R.band(flat, "eval_loss") == pytest.approx((0.35, 0.41))
    assert R.band({**agg, "mean": (0.95, 0.05)}, "mean") == pytest.approx((0.80, 1.0))


def test_render_and_replace_block_round_trip():
    runs = [dict(r, load_average=[2.5 + i, 3.1]) for i, r in enumerate(RUNS)]
    block = R.render({"runs": runs})
    assert "Machine: AMD EPYC (cpu, 1 x cpu), jax 0.10.2, commit 5ea5208" in block
    assert "load average 2.5 to 5.5 at the runs' starts and ends" in block
    assert "not recorded for 1 of 4 runs" in R.render({"runs": runs[:3] + RUNS[3:]})
    assert "eval loss 4.900 ± 0.100" in block  # one base per seed: 4.8, 4.9, 5.0
    text = f"intro\n{R.MARK_BEGIN}\nold table\n{R.MARK_END}\nafter\n"
    new = R.replace_block(text, block)
    assert "old table" not in new and new.startswith("intro\n") and new.endswith("after\n")
    assert R.replace_block(new, block) == new
    with pytest.raises(ValueError, match="reproduce:begin"):
        R.replace_block("no markers", block)


@pytest.mark.parametrize("name", list(R.ROWS))
def test_a_seed_changes_base_data_and_run_seeds_and_nothing_else(name):
    a, b = R.experiment(R.ROWS[name], 0), R.experiment(R.ROWS[name], 2)
    assert (b.seed, b.base.seed, b.data.seed) == (2, 2, 2)
    assert (a.seed, a.base.seed, a.data.seed) == (0, 0, 0)
    import dataclasses
    same = lambda e: dataclasses.replace(e, seed=0, base=dataclasses.replace(e.base, seed=0),
                                         data=dataclasses.replace(e.data, seed=0))
    assert same(b) == a
    assert R.run_name(name, 2, steps=20) == f"{name}_s2_steps20"


def test_readme_table_is_the_rendering_of_the_committed_results():
    results = json.loads((ROOT / "docs/results/default.json").read_text())
    readme = (ROOT / "README.md").read_text()
    block = readme.split(R.MARK_BEGIN, 1)[1].split(R.MARK_END, 1)[0].strip()
    assert block == R.render(results), "README's table is stale: run experiments.reproduce --readme"
    assert (ROOT / "docs/results/default.md").read_text().strip() == block


def test_check_compares_one_run_of_an_unused_seed_with_the_results_file(tmp_path, monkeypatch,
                                                                          capsys):
    results = tmp_path / "default.json"
    results.write_text(json.dumps({"runs": RUNS}))
    fresh = {"value": fake_run("lora", 3, 0.88, 0.37, 0.39)}
    monkeypatch.setattr(R, "run_one", lambda name, seed, root: fresh["value"])
    assert R.check(results, tmp_path, 3) == 0
    assert "OUTSIDE" not in capsys.readouterr().out
    fresh["value"] = fake_run("lora", 3, 0.88, 0.37, 0.60)  # eval loss far above the band
    assert R.check(results, tmp_path, 3) == 1
    assert "eval_loss" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="one of the table's seeds"):
        R.check(results, tmp_path, 1)
