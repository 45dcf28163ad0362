"""One process of test_sharded_birth's 2-process load: ``python -m tests.train.hf_load_child DIR
HOST:PORT PROCESS_ID``. Joins the 2-process run, measures its resident memory, loads ``DIR`` with
``hf_sharded.load_hf_sharded`` under ``fsdp``, and prints one JSON line: the peak growth of its
resident memory over the load, the bytes of its own shards, the largest tensor and the total, and
whether ``sharding.put`` kept and resharded a global array right."""

import json
import sys


def memory(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in bytes. Not
    ``ru_maxrss``: Linux carries that over from the forking parent (pytest) across exec."""
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main(path: str, address: str, process_id: int) -> None:
    import jax

    jax.distributed.initialize(address, num_processes=2, process_id=process_id,
                               initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lora_jax import sharding
    from lora_jax.models import hf_sharded
    from lora_jax.train.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(preset="fsdp"))
    # Warm-up: trace the model's abstract init once (the loader's first step), so that the
    # baseline holds the tracing caches and code pages, not only the loaded weights.
    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    sharding.param_logical_specs(hf_sharded.hf_module(path), tokens, mesh=mesh,
                                 rules=sharding.RULES["fsdp"])
    baseline = memory("VmRSS")
    _, params = hf_sharded.load_hf_sharded(path, mesh, sharding.RULES["fsdp"])
    peak = memory("VmHWM")
    leaves = jax.tree.leaves(params)
    local = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    # sharding.put on a global array: kept as is (may_alias) or resharded across processes.
    kernel = params["h_0"]["mlp"]["c_fc"]["kernel"]
    whole = sharding.put(kernel, NamedSharding(mesh, P()))
    put_ok = (sharding.put(kernel, kernel.sharding, may_alias=True) is kernel
              and whole.is_fully_replicated
              and np.array_equal(np.asarray(whole.addressable_data(0)),
                                 multihost_utils.process_allgather(kernel, tiled=True)))
    print(json.dumps({"peak_growth": peak - baseline, "local_bytes": local,
                      "largest_tensor": max(x.nbytes for x in leaves),
                      "total_bytes": sum(x.nbytes for x in leaves), "put_ok": bool(put_ok)}),
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
