"""What every benchmark script shares: median timing, interleaved rounds, the machine and its load,
XLA's peak-memory figure, and rewriting one section of BENCHMARKS.md. No flags here (the scripts
define their own)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import jax


def time_fn(fn, *args, steps: int) -> float:
    """Median wall seconds of ``fn(*args)`` over ``steps`` calls after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, rounds: int) -> dict:
    """Wall seconds of each ``fns[name]()`` over ``rounds`` interleaved rounds.

    Each function is called once first (compile, warm-up); then every round calls each function
    once, in the given order, so a change in the machine's load hits every entry alike.
    Returns ``{name: [seconds per round]}``.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    """Median, min and max of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "n": len(times)}


def ratio_per_round(times: dict, name: str, ref: str) -> dict:
    """``summary`` of the round-by-round ratio ``times[name][i] / times[ref][i]``."""
    return summary([a / b for a, b in zip(times[name], times[ref])])


def machine() -> dict:
    """CPU model, core count and the 1-minute load average now (call it at the end of a run)."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                      if l.startswith("Model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average": os.getloadavg()[0]}


def peak_mib(jitted, *args) -> float:
    """XLA's accounting of a compiled call: arguments + outputs + temporaries − donated aliases."""
    m = jitted.lower(*args).compile().memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return peak / 2**20


def write_section(path: Path, section: str) -> None:
    """Replaces (or appends) the section of ``path`` that starts with the same '## ' heading."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


MATMUL_KINDS = ("ynn_fusion", "dot")
NOT_THUNKS = ("ThunkExecutor", "$", "Slinky", "Pjit", "Common", "Parse", "Handle", "end:")


def thunk_kinds(trace_dir: str, calls: int) -> collections.Counter:
    """Milliseconds per call of each thunk kind in the trace under ``trace_dir``."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(NOT_THUNKS):
            kind = re.sub(r"[.\d]+$", "", name)
            kinds["matmul" if kind in MATMUL_KINDS else kind] += e["dur"] / 1e3 / calls
    return kinds
