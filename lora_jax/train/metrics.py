"""Metrics out of a run: ``metrics.jsonl`` (one JSON object per record), TensorBoard events, and
the progress line (steps/s, tokens/s, ETA)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    """Appends records to ``<workdir>/metrics.jsonl`` and scalars to TensorBoard (``<workdir>/tb``)."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, split: str, **values) -> None:
        record = {"step": step, "split": split, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    self.tb.add_scalar(f"{split}/{name}/{k}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self.tb.close()


class Progress:
    """Throughput and ETA over the steps since the last report."""

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int):
        self.total, self.tokens = total_steps, tokens_per_step
        self.last_step, self.last_time = start_step, time.perf_counter()

    def report(self, step: int) -> dict:
        now = time.perf_counter()
        sps = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / max(sps, 1e-9)
        return {"steps_per_sec": sps, "tokens_per_sec": sps * self.tokens, "eta_sec": eta}


def format_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
