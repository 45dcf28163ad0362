"""Adapter files: round trip with static metadata, shape checks, corrupt files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import io

PARAMS = {"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)}}


def _adapters(method="dora"):
    spec = lj.LoraSpec(rank=2, alpha=4.0, targets=(r"a/kernel",), method=method,
                       modules_to_save=(r"b/bias",))
    return lj.init_adapters(PARAMS, spec, jax.random.key(0))


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    adapters = _adapters()
    io.save_adapters(tmp_path, adapters, {"note": "x"})
    loaded, meta = io.load_adapters(tmp_path, PARAMS)
    assert meta == {"note": "x"}
    assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    merged = lj.merge(PARAMS, loaded)
    np.testing.assert_allclose(merged["a"]["kernel"], lj.merge(PARAMS, adapters)["a"]["kernel"])


def test_load_checks_shapes_and_files(tmp_path):
    io.save_adapters(tmp_path, _adapters("lora"))
    with pytest.raises(ValueError, match="expects kernel"):
        io.load_adapters(tmp_path, {"a": {"kernel": jnp.ones((8, 5))}, "b": PARAMS["b"]})
    (tmp_path / io.ARRAYS).write_bytes(b"\x93garbage")
    with pytest.raises(ValueError, match="corrupt"):
        io.load_adapters(tmp_path)
    with pytest.raises(FileNotFoundError, match="exported adapter"):
        io.load_adapters(tmp_path / "nowhere")
