"""The command line explains itself: --helpshort lists every config field with its default and help,
--print_config prints the resolved config, and user errors are one line (a traceback only with -v).
Nothing here trains: each subprocess stops at flag parsing or at the first user error."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from lora_jax.train.config import Experiment, OptimConfig
from tests.procs import child_env

ROOT = Path(__file__).resolve().parents[2]
ENV = child_env()


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize("wrong,right", [("optim.learning_rate", "optim.lr"),
                                         ("adapter.rnak", "adapter.rank"),
                                         ("train.lr", "optim.lr"),
                                         ("train.warmup", "optim.warmup_steps"),
                                         ("adaptr.rank", "adapter.rank"),
                                         ("model.familly", "model.family")])
def test_suggest_field(wrong, right):
    paths = common.field_paths(common.get_config())
    assert common.suggest_field(wrong, paths) == right


def test_nothing_close_suggests_nothing():
    paths = common.field_paths(common.get_config())
    assert common.suggest_field("zzz", paths) is None
    assert common.did_you_mean("zzz", paths) == ""


def test_field_help_comes_from_the_dataclass_comments():
    helps = common.field_help(OptimConfig)
    assert helps["grad_clip"] == "0 disables clipping"
    assert helps["lr"] == ""  # no comment, no help


def test_describe_fields_lists_every_field_within_100_columns():
    text = common.describe_fields(Experiment) + "\n" + common.describe_method_args()
    for path in common.field_paths(common.get_config()):
        if path.startswith("method_args."):  # listed per method: 'lora: init_weights=...'
            assert f"{path.split('.')[1]}=" in text, path
        else:
            assert f"  {path} = " in text, path
    assert max(len(line) for line in text.splitlines()) <= 100
    line = next(l for l in text.splitlines() if l.startswith("  optim.grad_clip = 1.0"))
    assert line.endswith("0 disables clipping")


def test_apply_overrides_names_the_closest_field():
    with pytest.raises(KeyError, match=r"override 'optim.learning_rate': no such field; did you "
                                       r"mean 'optim.lr'\?"):
        common.apply_overrides(common.get_config(), {"optim.learning_rate": 1})


# ----------------------------------------------------------------------------- subprocesses


def test_helpshort_lists_the_fields_and_the_docstring_prints_intact():
    proc = run("experiments.train", "--helpshort")
    out = proc.stdout + proc.stderr
    assert "--workdir=runs/r4 \\\n        --config.optim.lr=1e-3" in out
    assert "optim.lr = 0.003" in out and "adapter.rank = 8" in out
    assert "--[no]print_config: Print the resolved config and exit." in out


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
    proc = run("experiments.train", "--config=configs/lora.py:small,rank=4", "--print_config",
               "--config.optim.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "optim.lr = 0.01" in lines and "adapter.rank = 4" in lines
    assert f"train.steps = {common.SMALL_STEPS}" in lines
    assert "data.tasks = ('digits_reverse', 'kv_recall')" in lines
    assert len(lines) == len(common.field_paths(common.get_config()))


@pytest.mark.parametrize("verbose", [False, True])
def test_unknown_field_is_one_line_with_a_suggestion(tmp_path, verbose):
    workdir = tmp_path / "w"
    proc = run("experiments.train", "--config=configs/lora.py", f"--workdir={workdir}",
               "--config.optim.learning_rate=1", *(["-v", "1"] if verbose else []))
    assert proc.returncode != 0
    if verbose:  # absl's own error, with the traceback
        assert "Traceback" in proc.stderr and "learning_rate" in proc.stderr
    else:
        assert proc.stderr.splitlines() == [
            "error: --config.optim.learning_rate: no such config field; did you mean 'optim.lr'? "
            "(--helpshort lists the fields)"]
    assert not workdir.exists()


def test_bad_config_arg_is_one_line(tmp_path):
    proc = run("experiments.train", "--config=configs/lora.py:rnak=4", f"--workdir={tmp_path}/w")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "error: --config=configs/lora.py:rnak=4: config arg 'rnak=4': expected key=value with key "
        "in ['alpha', 'init', 'rank', 'rslora', 'steps', 'targets']"]


def test_a_value_error_from_the_run_is_one_line(tmp_path):
    proc = run("experiments.train", "--config=configs/lora.py", f"--workdir={tmp_path}/w",
               "--config.base.source=init", "--config.data.kind=csv")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: unknown data.kind 'csv'; use 'tasks', 'jsonl', "
                                        "'text', 'sentences' or 'images'"]


def test_sweep_checks_its_shared_config_flags_too(tmp_path):
    proc = run("experiments.sweep", "--config=configs/lora.py:small", f"--workdir={tmp_path}/w",
               "--config.adapter.rnak=2", "--print_commands")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: --config.adapter.rnak: no such config field; did you mean 'adapter.rank'? "
        "(--helpshort lists the fields)"]


def test_small_runs_log_often_and_share_the_full_runs_base():
    """>= 10 train-loss points for a 60-step 'small' sweep, and the denser logging does not change
    the pretrained base's cache key (``pretrain_experiment`` builds its own TrainConfig)."""
    from lora_jax.train import from_dict
    from lora_jax.train.trainer import pretrain_experiment

    small = common.load_config("configs/lora.py:small")
    full = common.load_config("configs/lora.py")
    assert 60 // small.train.log_every >= 10
    assert small.train.log_every != full.train.log_every
    bases = [pretrain_experiment(from_dict(Experiment, c.to_dict())) for c in (small, full)]
    assert bases[0] == bases[1]
