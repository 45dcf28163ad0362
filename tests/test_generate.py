"""Generation with a KV cache: cached logits equal full re-forwarding, greedy is its argmax, the
decode step compiles once, merged == factored, left padding, EOS, sampling, the 8-device mesh and
exact match by decoding (against teacher forcing)."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import sharding
from lora_jax.data import exact_match, make_task_dataset
from lora_jax.generate import decode_step, left_pad, sample, Sampling
from lora_jax.models import get_model

SMALL = dict(vocab_size=128, d_model=64, n_layers=2)
PROMPTS = [[5, 17, 3, 99, 4, 8], [7, 2], [11, 12, 13, 14], [1]]


@functools.cache
def _setup(family, scan, **extra):
    heads = dict(n_head=4) if family == "gpt2" else dict(n_heads=4, n_kv_heads=2, d_ff=96)
    model, _ = get_model(family, "tiny", scan_layers=scan, **{**SMALL, **heads, **dict(extra)})
    x = jnp.zeros((1, 8), jnp.int32)
    params = jax.tree.map(jnp.asarray, jax.jit(model.init)(jax.random.key(0), x)["params"])
    params = lj.transform._unbox(params)
    layouts = lj.trace_layouts(model, params, x)
    spec = lj.LoraSpec(rank=4, alpha=8.0, targets=("all-linear",))
    adapters = lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    adapters = _randomize(adapters, jax.random.key(2))
    return model, params, adapters


def _randomize(adapters, key):
    """Nonzero B, so the adapters change the output."""
    leaves, tree = jax.tree.flatten(adapters, is_leaf=lj.methods.is_adapter)
    out = []
    for k, a in zip(jax.random.split(key, len(leaves)), leaves):
        b = 0.3 * jax.random.normal(k, a.params["b"].shape)
        out.append(lj.Adapter({**a.params, "b": b}, a.state, a.method, a.scale, a.layout))
    return jax.tree.unflatten(tree, out)


def _full_logits(model, params, adapters, prompt, mask, new):
    """Logits of one uncached forward over prompt + generated tokens, with the same positions."""
    tokens = jnp.concatenate([prompt, new], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones(new.shape, bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
    return lj.apply(model, params, adapters or {}, tokens, positions=positions, kv_mask=full_mask)


@pytest.mark.parametrize("family,scan", [
    ("gpt2", False), ("llama", True),
    pytest.param("gpt2", True, marks=pytest.mark.slow),
    pytest.param("llama", False, marks=pytest.mark.slow)])
def test_greedy_is_argmax_of_reforwarding_and_cached_logits_match(family, scan):
    model, params, adapters = _setup(family, scan)
    prompt, mask = left_pad(PROMPTS)
    new, logits = lj.generate(model, params, adapters, prompt, 6, prompt_mask=mask,
                              return_logits=True)
    full = _full_logits(model, params, adapters, jnp.asarray(prompt), jnp.asarray(mask), new)
    p = prompt.shape[1]
    ref = full[:, p - 1: p - 1 + 6]  # the slot before token t predicts token t
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(new, jnp.argmax(ref, -1))
    assert not np.allclose(logits, _full_logits(model, params, None, prompt, mask, new)
                           [:, p - 1: p - 1 + 6], atol=1e-3)  # the adapters do matter


def test_left_padding_does_not_change_a_row():
    model, params, adapters = _setup("llama", False)
    prompt, mask = left_pad(PROMPTS)
    batched = lj.generate(model, params, adapters, prompt, 5, prompt_mask=mask)
    alone = lj.generate(model, params, adapters, jnp.array([PROMPTS[3]]), 5)  # 5 pads in batch
    np.testing.assert_array_equal(batched[3], alone[0])


def test_merged_model_generates_the_same_tokens():
    model, params, adapters = _setup("gpt2", False)
    prompt, mask = left_pad(PROMPTS)
    factored = lj.generate(model, params, adapters, prompt, 8, prompt_mask=mask)
    merged = lj.generate(model, lj.merge(params, adapters), None, prompt, 8, prompt_mask=mask)
    np.testing.assert_array_equal(factored, merged)
    base = lj.generate(model, params, None, prompt, 8, prompt_mask=mask)
    assert not np.array_equal(base, factored)


def test_decode_step_compiles_once_for_all_positions():
    model, params, adapters = _setup("gpt2", False, n_positions=96)  # a model no other test uses
    prompt, mask = left_pad(PROMPTS)
    before = decode_step._cache_size()
    lj.generate(model, params, adapters, prompt, 7, prompt_mask=mask)
    assert decode_step._cache_size() == before + 1  # 6 steps, 6 positions, one compile
    other = np.asarray(prompt)[::-1].copy(), np.asarray(mask)[::-1].copy()
    lj.generate(model, params, adapters, other[0], 7, prompt_mask=other[1])
    assert decode_step._cache_size() == before + 1


def test_eos_stops_each_row_and_pads_after():
    model, params, adapters = _setup("gpt2", False)
    prompt, mask = left_pad(PROMPTS)
    free = np.asarray(lj.generate(model, params, adapters, prompt, 8, prompt_mask=mask))
    eos = int(free[0, 2])
    out = np.asarray(lj.generate(model, params, adapters, prompt, 8, prompt_mask=mask,
                                 eos_id=eos, pad_id=-1))
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free == eos)
        stop = hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(row[:stop], row_free[:stop])
        assert (row[stop:] == -1).all()
    assert (out[0, 3:] == -1).all()


def test_right_padding_is_refused():
    model, params, adapters = _setup("gpt2", False)
    with pytest.raises(ValueError, match="LEFT-padded"):
        lj.generate(model, params, adapters, jnp.ones((1, 3), jnp.int32), 2,
                    prompt_mask=jnp.array([[True, True, False]]))


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top2 = np.asarray(sample(logits, keys, Sampling(1.0, top_k=2)))
    assert set(top2) == {0, 1}
    assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05  # renormalised over the top 2
    top_p = np.asarray(sample(logits, keys, Sampling(1.0, top_p=0.7)))
    assert set(top_p) == {0, 1}  # 0.5 < 0.7 <= 0.8: the smallest set with mass >= 0.7
    plain = np.asarray(sample(logits, keys, Sampling(1.0)))
    assert set(plain) == {0, 1, 2, 3}
    assert abs((plain == 3).mean() - 0.05) < 0.02


def test_sampled_generation_is_reproducible_and_top_k_1_is_greedy():
    model, params, adapters = _setup("gpt2", False)
    prompt, mask = left_pad(PROMPTS)
    kw = dict(prompt_mask=mask, temperature=2.0, rng=jax.random.key(3))
    a = lj.generate(model, params, adapters, prompt, 6, **kw)
    np.testing.assert_array_equal(a, lj.generate(model, params, adapters, prompt, 6, **kw))
    b = lj.generate(model, params, adapters, prompt, 6, **{**kw, "rng": jax.random.key(4)})
    assert not np.array_equal(a, b)
    greedy = lj.generate(model, params, adapters, prompt, 6, prompt_mask=mask)
    top1 = lj.generate(model, params, adapters, prompt, 6, top_k=1, **kw)
    np.testing.assert_array_equal(greedy, top1)


def test_generation_under_the_8_device_mesh():
    model, params, adapters = _setup("gpt2", False)
    mc = types.SimpleNamespace(preset="fsdp_tp", data=0, fsdp=0, tensor=0, rules="",
                               num_devices=0)
    mesh = sharding.make_mesh(mc)
    x = jnp.zeros((1, 8), jnp.int32)
    specs = sharding.param_logical_specs(model, x)
    shard = sharding.base_shardings(specs, mesh, sharding.logical_rules(mc), params)
    sharded = sharding.put(params, shard)
    assert len(sharded["wte"]["embedding"].sharding.device_set) == 8
    prompt, mask = left_pad(PROMPTS * 2)  # batch 8
    prompt = jax.device_put(prompt, sharding.batch_sharding(mesh))
    out = lj.generate(model, sharded, adapters, prompt, 5, prompt_mask=mask)
    np.testing.assert_array_equal(
        out, lj.generate(model, params, adapters, np.asarray(prompt), 5, prompt_mask=mask))


@pytest.mark.slow
def test_exact_match_by_decoding_agrees_with_teacher_forcing():
    model, params, adapters = _setup("gpt2", False, vocab_size=260)
    data = make_task_dataset(["copy", "reverse"], "eval", 6, seed=0, seq_len=24)
    inputs, targets, loss = (np.array(data[k]) for k in ("inputs", "targets", "loss_mask"))
    # Make half the answers the model's own greedy continuation, so both metrics see hits.
    for i in range(0, len(inputs), 2):
        s, e = (np.flatnonzero(loss[i])[[0, -1]] + [0, 1])
        out = np.asarray(lj.generate(model, params, adapters, inputs[None, i, : s + 1], e - s))[0]
        targets[i, s:e], inputs[i, s + 1: e] = out, out[:-1]
    data = {**data, "inputs": inputs, "targets": targets}
    teacher = exact_match(np.asarray(jnp.argmax(lj.apply(model, params, adapters, inputs), -1)),
                          targets, loss)
    decoded = lj.greedy_exact_match(model, params, adapters, data, batch_size=5)
    np.testing.assert_array_equal(decoded, teacher)
    assert decoded[::2].all() and not decoded[1::2].any()


@pytest.mark.slow
def test_experiments_generate_on_a_finished_run(tmp_path):
    import dataclasses

    from configs.lora import get_config
    from experiments import generate as cli
    from lora_jax.train import Experiment, from_dict, train_and_evaluate

    cfg = from_dict(Experiment, get_config("").to_dict())
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, preset="tiny", hf_path="", overrides=(
            "d_model=32,n_layers=2,n_head=2,n_positions=48,vocab_size=320")),
        base=dataclasses.replace(cfg.base, source="init"),
        data=dataclasses.replace(cfg.data, n_train_per_task=8, n_eval_per_task=4, seq_len=24),
        train=dataclasses.replace(cfg.train, steps=2, batch_size=8, eval_every=1000,
                                  log_every=1, checkpoint_every=1000, eval_batch_size=8))
    train_and_evaluate(cfg, tmp_path)
    _, tok, model, base, (params, adapters) = cli.load_run(tmp_path)
    assert lj.rules.flatten(adapters) and params is base
    prompts = ["ab=", "reverse: xyz="]
    texts = cli.complete(model, params, adapters, tok, prompts, max_new_tokens=6)
    tokens, mask = left_pad([[tok.bos_id] + tok.encode(p) for p in prompts], tok.pad_id)
    ids = lj.generate(model, params, adapters, tokens, 6, prompt_mask=mask, eos_id=tok.eos_id,
                      pad_id=tok.pad_id)
    assert texts == [tok.decode([t for t in r if t != tok.eos_id]) for r in ids.tolist()]
    identity = json.loads((tmp_path / "run.json").read_text())
    identity.pop("recorded")  # the environment the run recorded, not a config field
    cfg = from_dict(Experiment, identity)
    both = cli.exact_match_both(cfg, tok, model, params, adapters, batch_size=8)
    assert both["rows_that_disagree"] == 0
    assert set(both["teacher_forced"]) == set(both["greedy_decoding"])
