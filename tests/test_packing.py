"""Packed rows: segment ids from the loaders, block-diagonal attention and per-segment positions in
GPT-2 and Llama, and a loss that never predicts across a boundary."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import sharding
from lora_jax.data.kinds import get_kind
from lora_jax.data.text import load_jsonl, rows_to_arrays
from lora_jax.data.tokenizers import ByteTokenizer
from lora_jax.models import get_model
from lora_jax.models.gpt2 import segment_positions
from lora_jax.train.config import MeshConfig
from lora_jax.train.steps import objective_for

TOK = ByteTokenizer()
SEQ = 32
RECORDS = [  # 5 to 16 tokens with BOS and EOS: several share a row of SEQ + 1 tokens
    {"prompt": "2+2=", "completion": "4"}, {"prompt": "say hi: ", "completion": "hi"},
    {"prompt": "reverse abc: ", "completion": "cba"}, {"prompt": "x", "completion": "y"},
    {"prompt": "copy hello: ", "completion": "hello"}, {"prompt": "7*6=", "completion": "42"},
    {"prompt": "a", "completion": "bcd"}]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing") / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    return str(path)


def _example_tokens(record):
    return [TOK.bos_id] + TOK.encode(record["prompt"] + record["completion"]) + [TOK.eos_id]


def test_load_jsonl_packs_by_default_with_segments_at_example_boundaries(jsonl):
    packed = load_jsonl(jsonl, TOK, SEQ)
    assert len(packed["inputs"]) < len(RECORDS)  # packing is the default
    seg = packed["segment_ids"]
    found = []
    for row in range(len(seg)):
        k = seg[row][seg[row] > 0]
        assert k[0] == 1 and set(np.diff(k)) <= {0, 1}  # 1, 2, ... contiguous, then padding
        assert (seg[row][len(k):] == 0).all()
        for s in range(1, k.max() + 1):
            found.append(packed["inputs"][row][seg[row] == s].tolist())
    assert len(found) == len(RECORDS)
    for tokens, record in zip(found, RECORDS):  # in file order; the row's last loses its EOS
        full = _example_tokens(record)
        assert tokens in (full, full[:-1]), (tokens, full)


def test_jsonl_kind_packs_train_rows_and_scores_eval_examples_one_per_row(jsonl):
    dc = types.SimpleNamespace(train_path=jsonl, eval_path=jsonl, seq_len=SEQ)
    train, evals, _ = get_kind("jsonl").load(dc, TOK)
    assert len(train["inputs"]) < len(RECORDS) and train["segment_ids"].max() > 1
    assert len(evals["inputs"]) == len(RECORDS) and evals["segment_ids"].max() == 1


def test_rows_to_arrays_drops_targets_across_a_boundary():
    rows = [[5, 6, 7, 8, 9, 10, 11, 12]]
    segments = [[1, 1, 1, 2, 2, 2, 3, 3]]
    out = rows_to_arrays(rows, [[True] * 8], [0], 9, 0, segments)
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 2, 2, 2, 3, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"][0], [1, 1, 0, 1, 1, 0, 1, 0, 0])
    assert "segment_ids" not in rows_to_arrays(rows, [[True] * 8], [0], 9, 0)


def test_packed_jsonl_never_predicts_across_a_boundary(jsonl):
    packed = load_jsonl(jsonl, TOK, SEQ)
    for row in range(len(packed["inputs"])):
        seg, mask = packed["segment_ids"][row], packed["loss_mask"][row] > 0
        assert (seg[mask] > 0).all()
        inner = mask[:-1] & (seg[1:] > 0)  # the target is the next input: same segment
        assert (seg[:-1][inner] == seg[1:][inner]).all()
        assert not (packed["targets"][row][mask] == TOK.bos_id).any()


def test_segment_positions_restart_per_segment():
    ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(ids),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def _per_example_losses(model, params, arrays, segment_ids):
    """Mean cross-entropy over each example's loss positions, in row-major, segment order."""
    logits = jax.jit(model.apply)(params, arrays["inputs"], segment_ids)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, arrays["targets"]))
    seg, mask = arrays["segment_ids"], arrays["loss_mask"]
    losses = []
    for row in range(len(seg)):
        for s in range(1, seg[row].max() + 1):
            m = mask[row] * (seg[row] == s)
            losses.append((ce[row] * m).sum() / m.sum())
    return np.array(losses)


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("llama", False), ("llama", True)])
def test_packed_losses_equal_unpacked(jsonl, family, scan):
    model, _ = get_model(family, "tiny", n_layers=2, scan_layers=scan)
    packed, alone = load_jsonl(jsonl, TOK, SEQ), load_jsonl(jsonl, TOK, SEQ, pack=False)
    params = model.init(jax.random.key(0), alone["inputs"][:1])
    inputs = objective_for("jsonl").model_inputs(packed)  # what the trainer feeds the model
    assert len(inputs) == 2 and inputs[1] is packed["segment_ids"]
    want = _per_example_losses(model, params, alone, None)
    got = _per_example_losses(model, params, packed, packed["segment_ids"])
    assert len(got) == len(RECORDS) and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # without segment ids the later examples of a row see the earlier ones
    leaky = _per_example_losses(model, params, packed, None)
    assert np.abs(leaky - want).max() > 1e-3


def test_unpacked_rows_with_segment_ids_match_the_plain_path():
    model, _ = get_model("gpt2", "tiny", n_layers=1)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 512)
    params = model.init(jax.random.key(0), tokens)
    ones = jnp.ones((2, 16), jnp.int32)
    np.testing.assert_allclose(model.apply(params, tokens, ones), model.apply(params, tokens),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="segment_ids .* decode with a cache without them"):
        model.apply(params, tokens, ones, cache={"k": None}, cache_index=jnp.int32(0))


def test_packed_batch_shards_over_8_devices_like_one(jsonl):
    """`segment_ids` travel as a batch key: sharded over the data axes (fsdp_tp mesh, params in
    their shards), the trainer's forward gives the 1-device logits."""
    model, _ = get_model("llama", "tiny", n_layers=1)
    packed = load_jsonl(jsonl, TOK, SEQ)
    batch = {k: np.resize(v, (4,) + v.shape[1:]) for k, v in packed.items()}  # 4 = fsdp size
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp_tp"))
    rules = sharding.logical_rules(MeshConfig(preset="fsdp_tp"))
    params = sharding.init_sharded(model, batch["inputs"][:1], mesh, rules)
    objective = objective_for("jsonl")
    fwd = sharding.batch_sharded(lambda t, f, inputs: model.apply({"params": t}, *inputs), mesh)
    run = jax.jit(lambda p, b: fwd(p, None, objective.model_inputs(b)))
    eight = run(params, sharding.shard_batch(batch, mesh))
    one = run(jax.device_get(params), batch)
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-5)
