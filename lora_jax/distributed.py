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

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def wanted(mc) -> bool:
    """Whether ``mc`` (or the environment) asks for a multi-process run."""
    return bool(mc.coordinator_address or mc.num_processes > 1
                or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(mc) -> None:
    """Calls ``jax.distributed.initialize`` once, if ``mc`` or the environment asks for it.

    Must run before anything touches a JAX device. An unreachable coordinator fails after
    ``mc.init_timeout_s`` seconds with an error naming the address, instead of hanging.
    """
    if not wanted(mc) or jax.distributed.is_initialized():
        return
    auto = mc.coordinator_address == "auto"
    kwargs = dict(
        coordinator_address=None if auto else (mc.coordinator_address or None),
        num_processes=mc.num_processes or None,
        process_id=None if mc.process_id < 0 else mc.process_id,
        initialization_timeout=mc.init_timeout_s,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # the runtime raises XlaRuntimeError / RuntimeError / ValueError
        address = kwargs["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS",
                                                                   "auto-detected")
        raise RuntimeError(
            f"jax.distributed.initialize failed (coordinator {address}, "
            f"{kwargs['num_processes'] or 'auto'} processes, this is process "
            f"{kwargs['process_id'] if kwargs['process_id'] is not None else 'auto'}, timeout "
            f"{mc.init_timeout_s}s): {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "Check that process 0 runs on that host and the port is open, and that every process "
            "got the same --config.mesh.coordinator_address and num_processes") from e


def gather(tree):
    """``tree`` with every array fully replicated, so host code (export, np.asarray) can read it
    on any process. A no-op in a single process."""
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

    def close(self) -> None:
        pass
