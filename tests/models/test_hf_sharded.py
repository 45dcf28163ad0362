"""HF checkpoints (GPT-2, Llama, BERT with its heads) read straight into their shards
(lora_jax.models.hf_sharded) on 8 devices."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from lora_jax import sharding
from lora_jax.models import hf_sharded, load_bert_checkpoint, load_hf_checkpoint
from lora_jax.train.config import MeshConfig
from tests.models import test_bert
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


def _bert_checkpoint(path, classifier: bool, shards: int = 1) -> str:
    weights = test_bert.hf_weights(test_bert.HF, prefix="bert." if classifier else "")
    if classifier:
        rng = np.random.default_rng(1)
        weights.update({"classifier.weight": rng.standard_normal((3, 32), np.float32),
                        "classifier.bias": rng.standard_normal(3, np.float32)})
    return write_checkpoint(path, test_bert.HF, weights, shards=shards)


@pytest.mark.parametrize("head, pooling, classifier, scan, shards", [
    ("none", "cls", False, False, 1),  # the encoder with its [CLS] pooler
    ("sequence", "mean", True, True, 2),  # a BertForSequenceClassification: 'bert.' + classifier
    ("token", "cls", False, False, 1),  # a head the checkpoint lacks: a fresh one, seeded
])
def test_bert_loads_into_its_shards_equal_to_the_whole_load(tmp_path, head, pooling, classifier,
                                                           scan, shards):
    path = _bert_checkpoint(tmp_path / "bert", classifier, shards)
    args = {"head": head, "pooling": pooling, "n_labels": 3, "seed": 5}
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp_tp"))
    before = {id(x) for x in jax.live_arrays()}
    _, params = hf_sharded.load_hf_sharded(path, mesh, sharding.RULES["fsdp_tp"],
                                           scan_layers=scan, overrides=args)
    new = [x for x in jax.live_arrays() if id(x) not in before]
    assert len(new) == len(jax.tree.leaves(params))  # no whole copy left behind
    for kp, x in jax.tree_util.tree_leaves_with_path(params):  # every array of the base is split
        if jax.tree_util.keystr(kp) != "['classifier']['bias']":  # (n_labels,): no logical axis
            assert max(s.data.size for s in x.addressable_shards) < x.size, kp
    module, want = load_bert_checkpoint(path, scan_layers=scan, **args)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    if head == "token":  # the fresh head is the module's own (jitted) init with that seed
        init = jax.jit(module.init)(jax.random.key(5), np.zeros((1, 1), np.int32))["params"]
        jax.tree.map(np.testing.assert_array_equal, params["classifier"],
                     nn.meta.unbox(init["classifier"]))


def test_bert_sharded_load_refuses_what_the_whole_load_refuses(tmp_path):
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp")), sharding.RULES["fsdp"]
    path = _bert_checkpoint(tmp_path / "clf", classifier=True)
    with pytest.raises(ValueError, match="n_labels=2"):  # the file's classifier has 3 labels
        hf_sharded.load_hf_sharded(path, mesh, rules, overrides={"head": "sequence"})
    weights = test_bert.hf_weights(test_bert.HF)
    weights["encoder.layer.1.output.dense.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"'encoder.layer.1.output.dense.bias' has shape \(5,\)"):
        hf_sharded.load_hf_sharded(write_checkpoint(tmp_path / "bad", test_bert.HF, weights),
                                   mesh, rules)


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
