"""Reports: the table's values from fixture runs with known numbers, valid PNG plots, axes from
overrides.json or run.json, missing / corrupt files named while the other runs still report,
missing optional values blank, a terminal table within 100 columns, no plot against a confounded
axis, seeds averaged (mean ± std), and one colour per series across figures."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np

from lora_jax import report
from tests.procs import child_env

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(workdir: Path, *, overrides=None, rank=4, loss=1.5, acc=(0.5, 0.25), run_json=None,
             drop=()):
    workdir.mkdir(parents=True)
    summary = {"method": "lora", "model": "gpt2/tiny", "trainable_params": 1000 * rank,
               "total_params": 100000, "steps": 20, "train_seconds": 2.5,
               "final_train_loss": loss + 0.1, "final_eval_loss": loss,
               "base_eval_loss": 3.0, "base_accuracy": {"a": 0.0, "b": 0.0, "mean": 0.0},
               "accuracy": {"a": acc[0], "b": acc[1], "mean": sum(acc) / 2},
               "tokens_per_sec": 12345.6}
    summary = {k: v for k, v in summary.items() if k not in drop}
    (workdir / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": s, "split": "train", "loss": loss + 1.0 / s, "tokens_per_sec": 1.0}
             for s in range(1, 21)] + [{"step": s, "split": "eval", "loss": loss + 0.5 / s,
                                        "accuracy": {"mean": 0.1}} for s in (10, 20)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if overrides is not None:
        (workdir / "overrides.json").write_text(json.dumps({"config": "c.py", "name": workdir.name,
                                                            "overrides": overrides}))
    if run_json is not None:
        (workdir / "run.json").write_text(json.dumps(run_json))
    (workdir / "checkpoints" / "20").mkdir(parents=True)  # not a run: never reported


def sweep_fixture(root: Path):
    for rank, targets, loss, acc in [(1, "qv", 2.0, (0.25, 0.0)), (4, "qv", 1.5, (0.5, 0.25)),
                                     (1, "all", 1.8, (0.5, 0.5)), (4, "all", 1.2, (1.0, 0.5))]:
        make_run(root / f"rank={rank}_targets={targets}", rank=rank, loss=loss, acc=acc,
                 overrides={"adapter.rank": rank, "adapter.targets": targets})


def assert_png(path: Path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image) > 0  # not blank


def test_table_values_and_plots(tmp_path):
    sweep_fixture(tmp_path)
    warnings = []
    runs = report.load_runs(tmp_path, warn=warnings.append)
    assert warnings == []
    out = report.write_report(runs, tmp_path / "out")
    columns, rows = out["table"]
    assert columns == ["run", "rank", "targets", "method", "steps", "trainable params", "eval loss",
                       "acc (mean)", "acc a", "acc b", "base acc (mean)", "tokens/s", "train s"]
    # Sorted by the axes in order (rank, then targets); values straight from the summaries.
    assert [r[0] for r in rows] == ["rank=1_targets=all", "rank=1_targets=qv",
                                    "rank=4_targets=all", "rank=4_targets=qv"]
    assert rows[2] == ["rank=4_targets=all", 4, "all", "lora", 20, 4000, 1.2, 0.75, 1.0, 0.5,
                       0.0, 12345.6, 2.5]
    md = out["markdown"].splitlines()
    assert md[0] == ("| run | rank | targets | method | steps | trainable params | eval loss | "
                     "acc (mean) | acc a | acc b | base acc (mean) | tokens/s | train s |")
    assert md[4] == ("| rank=4_targets=all | 4 | all | lora | 20 | 4,000 | 1.2000 | 0.750 | "
                     "1.000 | 0.500 | 0.000 | 12,346 | 2.5 |")
    with (tmp_path / "out" / "report.csv").open() as f:
        csv_rows = list(csv.reader(f))
    assert csv_rows[0] == columns and csv_rows[3][6] == "1.2" and csv_rows[1][2] == "all"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["loss_curves.png", "report.csv", "report.md", "vs_rank.png",
                     "vs_targets.png"]
    for name in ("loss_curves.png", "vs_rank.png", "vs_targets.png"):
        assert_png(tmp_path / "out" / name)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "![vs_rank](vs_rank.png)" in text and md[4] in text


def test_curves_are_read_from_metrics(tmp_path):
    sweep_fixture(tmp_path)
    run = {r.name: r for r in report.load_runs(tmp_path)}["rank=4_targets=qv"]
    assert len(run.curves["train"]) == 20 and run.curves["train"][0] == (1, 2.5)
    assert run.curves["eval"] == [(10, 1.55), (20, 1.525)]


def test_bad_files_are_named_and_the_rest_still_report(tmp_path):
    sweep_fixture(tmp_path)
    (tmp_path / "rank=1_targets=qv" / "summary.json").write_text('{"method": "lo')
    (tmp_path / "rank=4_targets=qv" / "summary.json").write_text('{"method": "lora"}')
    (tmp_path / "rank=1_targets=all" / "summary.json").unlink()
    with (tmp_path / "rank=4_targets=all" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "spl\n')
    warnings = []
    runs = report.load_runs(tmp_path, warn=warnings.append)
    assert [r.name for r in runs] == ["rank=4_targets=all"]
    assert len(runs[0].curves["train"]) == 20
    joined = "\n".join(warnings)
    bad_json = tmp_path / "rank=1_targets=qv" / "summary.json"
    assert f"{bad_json}: unreadable or not valid JSON" in joined
    assert (f"{tmp_path / 'rank=4_targets=qv' / 'summary.json'}: lacks final_eval_loss; left out"
            in joined)
    assert (f"{tmp_path / 'rank=1_targets=all' / 'summary.json'}: missing (the run is unfinished "
            "or failed)") in joined
    assert f"{tmp_path / 'rank=4_targets=all' / 'metrics.jsonl'}:23: not a metrics record" in joined
    out = report.write_report(runs, tmp_path / "out", notes=warnings)
    assert len(out["table"][1]) == 1
    assert "Left out or partly read" in (tmp_path / "out" / "report.md").read_text()


def test_axes_from_run_json_when_there_is_no_overrides_json(tmp_path):
    base = {"method": "lora", "adapter": {"rank": 2, "alpha": 16.0}, "seed": 0}
    make_run(tmp_path / "a", rank=2, run_json=base)
    make_run(tmp_path / "b", rank=8, run_json={**base, "adapter": {"rank": 8, "alpha": 16.0}})
    runs = report.load_runs(tmp_path)
    assert [r.overrides for r in runs] == [{"adapter.rank": 2}, {"adapter.rank": 8}]


def test_cli_prints_the_table_and_reports_bad_runs(tmp_path):
    sweep_fixture(tmp_path / "runs")
    (tmp_path / "runs" / "rank=1_targets=qv" / "summary.json").write_text("not json")
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path / "runs"),
                           f"--out={tmp_path / 'out'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert ("rank  targets  method  steps  params    loss    acc      a      b  base acc   "
            "tok/s  sec") in proc.stdout
    assert ("   4  all      lora       20   4,000  1.2000  0.750  1.000  0.500     0.000  "
            "12,346  2.5") in proc.stdout
    assert max(len(line) for line in proc.stdout.split("\nwrote ")[0].splitlines()) <= 100
    assert "rank=1_targets=qv/summary.json: unreadable or not valid JSON" in proc.stderr
    assert_png(tmp_path / "out" / "vs_rank.png")
    empty = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path / "none")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert empty.returncode != 0 and "no complete run (summary.json) under" in empty.stderr


def test_a_swept_method_is_one_column(tmp_path):
    make_run(tmp_path / "lora", overrides={"method": "lora"})
    make_run(tmp_path / "dora", overrides={"method": "dora"})
    columns, rows = report.table(report.load_runs(tmp_path))
    assert columns.count("method") == 1 and columns[:3] == ["run", "method", "steps"]
    assert [r[:2] for r in rows] == [["dora", "dora"], ["lora", "lora"]]


def test_a_missing_optional_value_is_blank_not_a_dropped_run(tmp_path):
    make_run(tmp_path / "a", overrides={"adapter.rank": 1}, rank=1, drop=("tokens_per_sec",))
    make_run(tmp_path / "b", overrides={"adapter.rank": 2}, rank=2, drop=("accuracy", "steps"))
    warnings = []
    runs = report.load_runs(tmp_path, warn=warnings.append)
    assert [r.name for r in runs] == ["a", "b"] and warnings == []
    out = report.write_report(runs, tmp_path / "out")
    columns, rows = out["table"]
    assert rows[0][columns.index("tokens/s")] is None and rows[0][columns.index("acc a")] == 0.5
    assert rows[1][columns.index("steps")] is None and rows[1][columns.index("acc (mean)")] is None
    md = out["markdown"].splitlines()
    assert md[2].endswith("| 0.000 |  | 2.5 |")  # tokens/s blank
    assert "\n1,000" not in out["text"] and len(out["text"].splitlines()) == 4
    assert (tmp_path / "out" / "report.csv").read_text().splitlines()[1].endswith(",0.0,,2.5")


def _methods_fixture(root: Path, seeds=(0,)):
    """A methods sweep: lr is set by the method (confounded), init varies within LoRA."""
    losses = {("lora", "default"): 1.2, ("dora", "default"): 1.1, ("lora", "pissa"): 1.0,
              ("full", "default"): 0.9}
    for (method, init), loss in losses.items():
        for seed in seeds:
            overrides = {"method": method, "adapter.init": init,
                         "optim.lr": 1e-3 if method == "full" else 3e-3}
            if len(seeds) > 1:
                overrides["seed"] = seed
            make_run(root / f"{method}_{init}_{seed}", overrides=overrides,
                     loss=loss + 0.1 * seed, acc=(0.5 + 0.1 * seed, 0.25))


def test_confounded_axes_get_no_plot(tmp_path):
    _methods_fixture(tmp_path)
    runs = report.load_runs(tmp_path)
    assert report.plottable_axes(runs) == ["method", "adapter.init"]
    assert report.label_axes(runs) == ["method", "adapter.init"]  # lr follows from them
    report.write_report(runs, tmp_path / "out", title="methods")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["loss_curves.png", "vs_init.png", "vs_method.png"]


def test_an_axis_in_step_with_a_plotted_one_gets_no_second_plot(tmp_path):
    for rank in (1, 4, 16):  # alpha = 2r: vs_alpha.png would repeat vs_rank.png
        make_run(tmp_path / f"r{rank}", overrides={"adapter.rank": rank,
                                                   "adapter.alpha": 2.0 * rank},
                 rank=rank, loss=1.0 / rank, acc=(0.5, 0.25))
    runs = report.load_runs(tmp_path)
    assert report.plottable_axes(runs) == ["adapter.rank"]
    report.write_report(runs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("vs_*.png")) == ["vs_rank.png"]


def test_terminal_table_fits_100_columns(tmp_path):
    _methods_fixture(tmp_path)
    for p in tmp_path.glob("*/summary.json"):  # long task names widen the table past 100
        s = json.loads(p.read_text())
        s["accuracy"] = {"digits_reverse_long": 0.5, "kv_recall_long_name": 0.25, "mean": 0.375}
        p.write_text(json.dumps(s))
    runs = report.load_runs(tmp_path)
    out = report.write_report(runs, tmp_path / "out")
    lines = out["text"].splitlines()
    assert max(map(len, lines)) <= 100, out["text"]
    assert lines[0].split()[:3] == ["method", "init", "lr"]  # the run column is left out
    assert lines[-1].startswith("(left out here: kv_recall_long_name")
    assert len(out["markdown"].splitlines()[0]) > 100  # report.md keeps every column


def test_seeds_are_averaged_with_error_bars_never_a_line(tmp_path):
    _methods_fixture(tmp_path, seeds=(0, 1, 2))
    runs = report.load_runs(tmp_path)
    assert "seed" not in report.plottable_axes(runs)
    assert "seed" not in report.label_axes(runs)
    table = report.seed_table(runs).splitlines()
    assert table[0] == "| method | init | seeds | eval loss | acc (mean) | acc a | acc b |"
    # lora/default: losses 1.2, 1.3, 1.4 -> 1.3 ± 0.1; task a 0.5 + 0.1 s, task b 0.25, mean
    # (a + b) / 2.
    row = next(l for l in table if l.startswith("| lora | default |"))
    assert row == ("| lora | default | 3 | 1.3000 ± 0.1000 | 0.425 ± 0.050 | 0.600 ± 0.100 | "
                   "0.250 ± 0.000 |")
    out = report.write_report(runs, tmp_path / "out", title="seeds")
    assert out["seeds"] == report.seed_table(runs)  # what experiments.report prints
    assert out["seeds"] in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "vs_seed.png").exists()
    assert_png(tmp_path / "out" / "vs_method.png")


def test_one_colour_per_series_across_figures(tmp_path):
    sweep_fixture(tmp_path)
    runs = report.load_runs(tmp_path)
    colours = report.Colours()
    report.plot_loss_curves(runs, tmp_path / "a.png", "t", colours)
    before = dict(colours.assigned)
    assert sorted(before) == ["rank=1, targets=all", "rank=1, targets=qv", "rank=4, targets=all",
                              "rank=4, targets=qv"]
    assert len({tuple(c) for c in before.values()}) == 4
    report.plot_axis(runs, "adapter.rank", "rank", tmp_path / "b.png", "t", colours)
    assert {k: colours.assigned[k] for k in before} == before  # unchanged by the second figure
    assert "targets=qv" in colours.assigned and colours("targets=qv") == colours("targets=qv")


def test_a_seed_from_a_shared_flag_is_averaged_like_a_swept_one(tmp_path):
    """``experiments.sweep ... --workdir=runs/s$s --config.seed=$s``: each seed's points carry
    the same overrides.json, and only run.json tells the seeds apart."""
    for seed in (0, 1, 2):
        for rank in (1, 4):
            make_run(tmp_path / f"s{seed}" / f"rank={rank}", overrides={"adapter.rank": rank},
                     rank=rank, loss=rank + 0.1 * seed, acc=(0.1 * seed, 0.5),
                     run_json={"seed": seed, "data": {"seed": 0}, "adapter": {"rank": rank}})
    runs = report.load_runs(tmp_path)
    assert runs[0].overrides == {"adapter.rank": 1, "seed": 0}  # data.seed is the same for all
    assert report.plottable_axes(runs) == ["adapter.rank"]
    table = report.seed_table(runs).splitlines()
    assert table[2] == ("| 1 | 3 | 1.1000 ± 0.1000 | 0.300 ± 0.050 | 0.100 ± 0.100 | "
                        "0.500 ± 0.000 |")
    (tmp_path / "s2" / "rank=4" / "summary.json").unlink()  # unfinished: 2 seeds, 1 at rank 4
    table = report.seed_table(report.load_runs(tmp_path)).splitlines()
    assert table[3] == ("| 4 | 2 | 4.0500 ± 0.0707 | 0.275 ± 0.035 | 0.050 ± 0.071 | "
                        "0.500 ± 0.000 |")
    (tmp_path / "s1" / "rank=4" / "summary.json").unlink()
    table = report.seed_table(report.load_runs(tmp_path)).splitlines()
    assert table[3] == "| 4 | 1 | 4.0000 | 0.250 | 0.000 | 0.500 |"  # one seed: no ± 0
    one_seed = report.load_runs(tmp_path / "s0")  # one seed: no seed axis, no seed table
    assert [r.overrides for r in one_seed] == [{"adapter.rank": 1}, {"adapter.rank": 4}]
    assert report.seed_table(one_seed) is None
