"""Metrics out of a run: ``metrics.jsonl`` (one JSON object per record), TensorBoard events
(scalars, the config as text and as hparams), and the progress line's rates (steps/s, tokens/s,
ETA) from step times after compilation. Nothing here computes a metric of the model; the trainer
hands them in.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping


def _finite_or_none(value: Any) -> Any:
    """NaN/inf -> None, so ``metrics.jsonl`` stays valid JSON; dicts recursively."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> ``{'optim.lr': 0.003, 'data.tasks': 'a,b', ...}``: dotted keys,
    values as TensorBoard hparams take them (tuples and lists joined by ',', None as '')."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{prefix}{key}."))
        elif isinstance(value, (tuple, list)):
            out[f"{prefix}{key}"] = ",".join(map(str, value))
        elif value is None:
            out[f"{prefix}{key}"] = ""
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else \
                str(value)
    return out


class MetricsWriter:
    """Appends records to ``<workdir>/metrics.jsonl`` and scalars to TensorBoard (``<workdir>/tb``).

    ``write(step, split, **values)`` takes any scalars (``loss``, ``lr``, ``grad_norm``, rates) and
    dicts of them (``accuracy``); a non-finite value is ``null`` in the JSON and left out of
    TensorBoard. ``write_config`` records the run's config once, as text and as hparams.
    """

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = SummaryWriter(str(Path(workdir) / "tb"))

    def write(self, step: int, split: str, **values) -> None:
        record = {"step": step, "split": split, **_finite_or_none(values)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for k, v in items:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{name}" + (f"/{k}" if k else ""), v, step)

    def write_config(self, config: Mapping[str, Any],
                     metrics: tuple[str, ...] = ("eval/loss", "eval/accuracy/mean")) -> None:
        """The run's config (a nested dict, e.g. ``to_dict(cfg)``) as TensorBoard text
        (``config``, one ``field = value`` line each) and as hparams, linked to the scalar tags
        ``metrics`` so the HParams dashboard compares runs by them. Call once, at step 0."""
        from tensorboardX.summary import hparams

        flat = flatten_config(config)
        text = "\n".join(f"    {k} = {v!r}" for k, v in sorted(flat.items()))  # Markdown code
        self.tb.add_text("config", text, 0)
        experiment, session_start, _ = hparams(flat, {m: 0.0 for m in metrics})
        for summary in (experiment, session_start):
            self.tb.file_writer.add_summary(summary)

    def close(self) -> None:
        self.tb.close()


class Progress:
    """Steps/s, examples/s (and tokens/s for token data) and ETA from the step times after
    compilation.

    The interval up to the first ``report`` holds the jit compile (and the first step's dispatch),
    so it gives no rate: the first report's values are NaN ("unknown") unless ``mark(step)`` was
    called once that step had finished, e.g. after the first step; every later report measures
    from the previous one. ``examples_per_step`` is the global batch; ``tokens_per_example`` the
    sequence length, or None for data without tokens (images), which then reports no tokens/s.
    """

    def __init__(self, total_steps: int, examples_per_step: int, start_step: int,
                 tokens_per_example: int | None = None):
        self.total, self.examples, self.tokens = total_steps, examples_per_step, tokens_per_example
        self.last_step, self.last_time, self.timed = start_step, time.perf_counter(), False

    def mark(self, step: int) -> None:
        """Restarts the clock at ``step`` (call when the compiling step has finished)."""
        self.last_step, self.last_time, self.timed = step, time.perf_counter(), True

    def report(self, step: int) -> dict:
        """``{'steps_per_sec', 'examples_per_sec', ['tokens_per_sec',] 'eta_sec'}`` since the
        previous report or mark."""
        now = time.perf_counter()
        steps, seconds = step - self.last_step, now - self.last_time
        timed, self.timed = self.timed, True
        self.last_step, self.last_time = step, now
        sps = steps / max(seconds, 1e-9) if timed and steps > 0 else math.nan
        rates = {"steps_per_sec": sps, "examples_per_sec": sps * self.examples}
        if self.tokens is not None:
            rates["tokens_per_sec"] = sps * self.examples * self.tokens
        return {**rates, "eta_sec": (self.total - step) / sps}

    def describe(self, rates: dict) -> str:
        """``'12.3 steps/s  45,678 tok/s'`` (``ex/s`` for data without tokens)."""
        per = (f"{rates['tokens_per_sec']:,.0f} tok/s" if "tokens_per_sec" in rates
               else f"{rates['examples_per_sec']:,.1f} ex/s")
        return f"{rates['steps_per_sec']:.1f} steps/s  {per}"


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``; NaN (not yet known) -> ``'-:--'``."""
    if not math.isfinite(seconds):
        return "-:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
