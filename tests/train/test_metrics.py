"""Metrics: rates and ETA from post-compile step times, valid JSON for non-finite values, and the
config written to TensorBoard as text and hparams (read back from the event file)."""

import json
import math
import struct

import pytest

from lora_jax.train import metrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", c)
    return c


def test_the_compile_interval_gives_no_rate(clock):
    progress = metrics.Progress(total_steps=100, examples_per_step=2, start_step=0,
                                tokens_per_example=5)
    clock.now += 30.0  # step 1 compiles for 30 s, then 9 steps at 0.1 s
    clock.now += 0.9
    first = progress.report(10)
    assert all(math.isnan(v) for v in first.values())
    clock.now += 2.0  # 20 steps at 0.1 s
    second = progress.report(30)
    assert second["steps_per_sec"] == pytest.approx(10.0)
    assert second["examples_per_sec"] == pytest.approx(20.0)
    assert second["tokens_per_sec"] == pytest.approx(100.0)
    assert metrics.Progress(100, 2, 0).report(1).keys() == {"steps_per_sec", "examples_per_sec",
                                                            "eta_sec"}  # no tokens: no tok/s
    assert second["eta_sec"] == pytest.approx(7.0)  # 70 steps left at 10/s, no compile in it


def test_mark_after_the_first_step_times_the_first_report(clock):
    progress = metrics.Progress(total_steps=100, examples_per_step=2, start_step=0,
                                tokens_per_example=5)
    clock.now += 30.0
    progress.mark(1)  # step 1 (the compile) done
    clock.now += 0.9
    rates = progress.report(10)
    assert rates["steps_per_sec"] == pytest.approx(10.0)
    assert rates["eta_sec"] == pytest.approx(9.0)


def test_format_duration():
    assert metrics.format_duration(75.2) == "1:15"
    assert metrics.format_duration(3725) == "1:02:05"
    assert metrics.format_duration(math.nan) == "-:--"


def _events(directory):
    """Every ``Event`` in the TFRecord files under ``directory``."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            out.append(event)
            i += 12 + n + 4
    return out


def test_writer_keeps_json_valid_and_records_the_config(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write_config({"method": "lora", "optim": {"lr": 0.003}, "data": {"tasks": ("a", "b")}})
    writer.write(1, "train", loss=2.5, lr=1e-4, grad_norm=0.7, eta_sec=math.nan)
    writer.write(1, "eval", loss=2.0, accuracy={"a": 0.5, "mean": math.inf})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(l, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
               for l in lines]
    assert records[0] == {"step": 1, "split": "train", "loss": 2.5, "lr": 1e-4, "grad_norm": 0.7,
                          "eta_sec": None}
    assert records[1]["accuracy"] == {"a": 0.5, "mean": None}
    tags = [v.tag for e in _events(tmp_path / "tb") for v in e.summary.value]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss",
            "eval/accuracy/a"} <= set(tags)
    assert "train/eta_sec" not in tags and "eval/accuracy/mean" not in tags
    assert "_hparams_/experiment" in tags and "_hparams_/session_start_info" in tags
    text = next(v for e in _events(tmp_path / "tb") for v in e.summary.value
                if v.tag.startswith("config"))
    assert b"optim.lr = 0.003" in text.tensor.string_val[0]
    assert b"data.tasks = 'a,b'" in text.tensor.string_val[0]


def test_flatten_config():
    assert metrics.flatten_config({"a": {"b": (1, 2), "c": None}, "d": True}) == {
        "a.b": "1,2", "a.c": "", "d": True}
