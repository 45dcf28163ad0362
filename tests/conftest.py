"""Test setup, before JAX starts: 8 simulated CPU devices, so sharding is tested for real; and
compilation made cheap, since the suite's time is mostly XLA compiling small programs.

- ``JAX_DISABLE_MOST_OPTIMIZATIONS``: XLA skips its expensive optimisation passes (a third less
  CPU time here); the programs compute the same functions, and every tolerance still holds.
- ``--xla_cpu_use_fusion_emitters=false``: XLA's CPU backend emits its fused loops the older
  way, which compiles a fifth faster here (the tiny LoRA experiment: 9.5 -> 7.5 s of CPU).
- A persistent compilation cache in a fresh folder per test session, shared by the xdist workers
  and the subprocesses the tests launch (they inherit the environment): the many tests that
  build the same tiny model compile each program once. Nothing carries over between sessions.
"""

import os
import tempfile

from tests.procs import COMPILE_FLAGS

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count=8 {COMPILE_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller's; workers inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_jax_tests_jit_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): the xdist workers start on the long poles (the SIGKILL
    loop, multi-process runs) while the many short tests fill in around them, instead of one
    long test starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
