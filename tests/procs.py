"""The environment of the processes that tests start (``python -m experiments.train`` and such):
the CPU platform, ``devices`` simulated devices, and conftest.py's compile settings (the children
also inherit its compilation-cache folder)."""

import os

COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"  # why: tests/conftest.py


def child_env(devices: int = 1, **extra: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}")
