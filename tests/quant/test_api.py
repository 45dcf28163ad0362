"""Package-level API: dispatch, accounting, import without side effects."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import quant


def test_quantize_dispatch_and_is_quantized():
    w = 0.02 * jnp.arange(128 * 16, dtype=jnp.float32).reshape(128, 16) / 2048
    for kind, cls in (("nf4", quant.NF4Array), ("int8", quant.Int8Array)):
        q = quant.quantize(w, kind)
        assert isinstance(q, cls) and quant.is_quantized(q)
        out = quant.dequantize(q, jnp.bfloat16)
        assert out.shape == w.shape and out.dtype == jnp.bfloat16
    assert not quant.is_quantized(w)
    assert quant.dequantize(w, jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="'fp8'.*int8.*nf4"):
        quant.quantize(w, "fp8")


def test_nbytes_counts_every_leaf():
    q = quant.int8_quantize(jnp.ones((64, 32)), block_size=32)
    assert quant.nbytes(q) == 64 * 32 + 2 * 32 * 4
    assert quant.nbytes(np.zeros((3, 4), np.float32)) == 48


def test_import_has_no_side_effects():
    code = ("import lora_jax.quant; from jax._src import xla_bridge as xb; "
            "assert not xb.backends_are_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)
