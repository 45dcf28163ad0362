"""HF checkpoints read straight into their shards (lora_jax.models.hf_sharded) on 8 devices."""

import jax
import numpy as np
import pytest

from lora_jax import sharding
from lora_jax.models import hf_sharded, load_hf_checkpoint
from lora_jax.train.config import MeshConfig
from tests.models.test_hf import GPT2_HF, LLAMA_HF, gpt2_weights, llama_weights, write_checkpoint


@pytest.mark.parametrize("family, scan, shards", [("gpt2", False, 1), ("llama", True, 2)])
def test_sharded_load_equals_whole_load_and_no_device_holds_a_whole_array(tmp_path, family, scan,
                                                                          shards):
    config = GPT2_HF if family == "gpt2" else LLAMA_HF
    weights = gpt2_weights(config) if family == "gpt2" else llama_weights(config)
    path = write_checkpoint(tmp_path / family, config, weights, shards=shards)
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp_tp"))
    rules = sharding.RULES["fsdp_tp"]
    before = {id(x) for x in jax.live_arrays()}
    _, params = hf_sharded.load_hf_sharded(path, mesh, rules, scan_layers=scan)
    new = [x for x in jax.live_arrays() if id(x) not in before]
    assert len(new) == len(jax.tree.leaves(params))  # no whole copy left behind
    for x in new:  # every array of the base is split: no device holds all of one
        assert max(s.data.size for s in x.addressable_shards) < x.size, x.shape
    _, want = load_hf_checkpoint(path, scan_layers=scan)
    jax.tree.map(np.testing.assert_array_equal, params, want)


class _Recorder:
    """A safe_open stand-in that records the slices read."""

    def __init__(self, tensor):
        self.tensor, self.reads = tensor, []

    def get_slice(self, name):
        del name
        return self

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor[index]


def test_read_block_reads_only_the_shards_rows_and_columns():
    hf = np.arange(24 * 8).reshape(24, 8)  # an HF Linear (out = heads 4 x head_dim 6, in 8)
    ours = (8, 4, 6)  # our (embed, heads, kv) kernel: hf.T.reshape(8, 4, 6)
    full = hf.T.reshape(ours)
    rec = _Recorder(hf)
    index = (slice(2, 4), slice(1, 3), slice(0, 6))
    got = hf_sharded.read_block(rec, "w", hf.shape, ours, True, index)
    np.testing.assert_array_equal(got, full[index])
    assert rec.reads == [(slice(6, 18), slice(2, 4))]  # 12 of 24 rows, 2 of 8 columns
    index = (slice(0, 8), slice(0, 4), slice(3, 6))  # a trailing axis sliced: its range is read
    np.testing.assert_array_equal(hf_sharded.read_block(rec, "w", hf.shape, ours, True, index),
                                  full[index])
