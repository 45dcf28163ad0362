"""Multi-host start-up: ``jax.distributed.initialize`` from ``MeshConfig`` or the environment.

One command runs on every host. The coordinator address, process count and process id come from
``MeshConfig`` (``coordinator_address``, ``num_processes``, ``process_id``), else from JAX's own
environment variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``),
else from JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI, Kubernetes) when
``coordinator_address='auto'``. Nothing is initialised for a plain single-process run. Meshes
and shardings live in ``lora_jax.sharding``; see docs/scaling.md for launch commands.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def wanted(mc) -> bool:
    """Whether ``mc`` (or the environment) asks for a multi-process run."""
    return bool(mc.coordinator_address or mc.num_processes > 1
                or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until ``host:port`` accepts TCP connections; raises a clear error at the timeout.

    JAX's client aborts the whole process (SIGABRT, a C++ stack trace) when the coordinator cannot
    be reached in time, so a process other than 0 checks the address first.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the JAX coordinator at {address} was not reachable within {timeout_s}s "
                    f"({e}). Start process 0 on that host (it serves the coordinator), check the "
                    "port is open, and give every process the same "
                    "--config.mesh.coordinator_address; or raise --config.mesh.init_timeout_s"
                ) from None
            time.sleep(0.5)


def initialize(mc) -> None:
    """Calls ``jax.distributed.initialize`` once, if ``mc`` or the environment asks for it.

    Must run before anything touches a JAX device. Processes other than 0 first wait up to
    ``mc.init_timeout_s`` for the coordinator's port and fail with an error naming the address
    (JAX itself would abort the process); all processes then wait up to that long for each other.
    """
    if not wanted(mc) or jax.distributed.is_initialized():
        return
    address = None if mc.coordinator_address == "auto" else (
        mc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    process_id = mc.process_id if mc.process_id >= 0 else (
        int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if address and process_id:
        _wait_for_coordinator(address, mc.init_timeout_s)
    print(f"jax.distributed.initialize: coordinator {address or 'auto-detected'}, "
          f"{mc.num_processes or 'auto'} processes, process {process_id}, waiting up to "
          f"{mc.init_timeout_s}s for all of them", flush=True)
    jax.distributed.initialize(coordinator_address=address, num_processes=mc.num_processes or None,
                               process_id=process_id, initialization_timeout=mc.init_timeout_s)


def gather(tree):
    """``tree`` with every array fully replicated, so host code (the adapter export, np.asarray)
    can read it on any process. A no-op in a single process. For small trees only: a parameter
    tree is written in its shards by ``io.save_params``."""
    if jax.process_count() == 1:
        return tree

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_replicated:
            return x
        return jax.jit(lambda y: y, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)

    return jax.tree.map(one, tree)


class NullWriter:
    """Stands in for ``MetricsWriter`` on processes other than 0."""

    def write(self, *args, **kwargs) -> None:
        del args, kwargs

    def write_config(self, *args, **kwargs) -> None:
        del args, kwargs

    def close(self) -> None:
        pass
