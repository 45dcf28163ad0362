"""Parameter-tree exports (``io.save_params``/``io.load_params``, orbax): on the 8 simulated
devices a tree sharded over ``fsdp`` is written shard by shard, never gathered, and reads back
equal on the host or straight into (other) shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint._src.serialization import replica_slices

from lora_jax import distributed, io


def _tree():
    mesh = jax.make_mesh((8,), ("fsdp",))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    kernel = jnp.arange(64 * 24, dtype=jnp.float32).reshape(64, 24) / 7
    return {"h_0": {"kernel": put(kernel, "fsdp", None),
                    "bias": put(jnp.linspace(-1, 1, 24, dtype=jnp.bfloat16))},
            "wte": {"embedding": put(kernel.T[:, :16] - 3, None, "fsdp")},
            "scale": np.float32([0.5, 2.0])}


def test_sharded_tree_is_written_in_its_shards_and_reads_back_equal(tmp_path, monkeypatch):
    tree = _tree()
    to_host, transfer = [], replica_slices.transfer_arrays_to_host

    def spy(arrays, *args, **kwargs):  # records (global shape, [shapes copied to the host])
        out = transfer(arrays, *args, **kwargs)
        to_host.extend((a.shape, [s.unsliced_data.shape for s in r.replica_slices])
                       for a, r in zip(arrays, out))
        return out

    def forbidden(*_, **__):
        raise AssertionError("a parameter export gathered an array")

    with monkeypatch.context() as m:
        m.setattr(replica_slices, "transfer_arrays_to_host", spy)
        for module, name in ((distributed, "gather"), (multihost_utils, "process_allgather"),
                             (jax, "device_get")):
            m.setattr(module, name, forbidden)
        io.save_params(tmp_path / "params", tree)
    pieces = dict(to_host)
    # Each device's shard of the fsdp-sharded arrays went to the host alone, never the whole
    # array; the replicated bias from one replica; the numpy leaf was never on a device.
    assert pieces == {(64, 24): [(8, 24)] * 8, (24, 16): [(24, 2)] * 8, (24,): [(24,)]}

    back = io.load_params(tmp_path / "params")  # the host reader
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(back))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, back)
    assert back["h_0"]["bias"].dtype == jnp.bfloat16

    # Straight into shardings other than the writer's (4 devices, the other axis).
    mesh4 = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[4:])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh4, P(*([None] * (x.ndim - 1)), "fsdp")
                                                 if x.ndim == 2 else P())), tree)
    placed = io.load_params(tmp_path / "params", like)
    for got, want, spec in zip(jax.tree.leaves(placed), jax.tree.leaves(tree),
                               jax.tree.leaves(like)):
        assert got.sharding == spec.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    with pytest.raises(FileNotFoundError, match="no parameter tree was exported there"):
        io.load_params(tmp_path / "nothing")
    (tmp_path / "old.msgpack").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="is a file, not a parameter directory"):
        io.load_params(tmp_path / "old.msgpack")
