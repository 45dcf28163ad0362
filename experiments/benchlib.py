"""What every benchmark script shares: median timing, XLA's peak-memory figure, and rewriting one
section of BENCHMARKS.md. No flags here (the scripts define their own)."""

from __future__ import annotations

import re
import statistics
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
