"""Sharding on 8 simulated CPU devices: meshes and their errors, adapter and optimizer shardings
derived from the rules, golden PartitionSpecs per preset, and 8-device runs that reproduce the
1-device losses. Regenerate the golden files with ``LORA_JAX_REGEN_GOLDEN=1``."""

import dataclasses
import importlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import models, sharding
from lora_jax.data import ArrayLoader
from lora_jax.train import Experiment, from_dict, trainer
from lora_jax.train.config import MeshConfig

GOLDEN = Path(__file__).parent / "golden"
PRESETS = ("dp", "fsdp", "fsdp_tp")
TINY_GPT2 = dict(d_model=32, n_layers=2, n_head=2, n_positions=32, vocab_size=320)
TINY_LLAMA = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, vocab_size=320,
                  max_seq_len=32)
# Losses of an 8-device run equal the 1-device run's to this relative tolerance (float32; only
# the order of the cross-device reductions differs).
LOSS_RTOL = 1e-5


# ----------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("preset, fsdp2, shape", [
    ("dp", 0, (8, 1, 1, 1)), ("fsdp", 0, (1, 8, 1, 1)), ("fsdp_tp", 0, (1, 4, 1, 2)),
    ("fsdp", 2, (1, 4, 2, 1))])
def test_preset_meshes_on_8_devices(preset, fsdp2, shape):
    mesh = sharding.make_mesh(MeshConfig(preset=preset, fsdp2=fsdp2))
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == shape
    assert mesh.devices.size == 8


def test_mesh_sizes_infer_and_override():
    assert sharding.mesh_shape(MeshConfig(preset="fsdp_tp", tensor=4), 8) == \
        {"data": 1, "fsdp": 2, "fsdp2": 1, "tensor": 4}
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1), 8) == {"data": 2, "fsdp": 4,
                                                                   "fsdp2": 1, "tensor": 1}
    assert sharding.make_mesh(MeshConfig(num_devices=1)).devices.size == 1


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"product 3\) do not divide the 8 devices"):
        sharding.mesh_shape(MeshConfig(preset="fsdp_tp", tensor=3), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match="use 4 of the 8 devices"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match="unknown mesh preset 'zero3'"):
        sharding.mesh_shape(MeshConfig(preset="zero3"), 8)


def test_rules_errors_and_overrides():
    rules = sharding.logical_rules(MeshConfig(preset="fsdp", rules="mlp=tensor,vocab=none"))
    assert rules["mlp"] == "tensor" and rules["vocab"] is None and rules["embed"] == ("fsdp", "fsdp2")
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        sharding.to_mesh_spec(("embed", "experts"), rules, "moe/kernel")
    with pytest.raises(ValueError, match="mesh axis 'fsdp' would shard two dimensions"):
        sharding.to_mesh_spec(("embed", "embed"), rules)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sharding.logical_rules(MeshConfig(rules="mlp=model"))


def test_batch_and_dimensions_must_divide():
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp"))
    with pytest.raises(ValueError, match=r"train.batch_size=12 does not divide .* \(size 8\)"):
        sharding.check_batch(12, mesh)
    with pytest.raises(ValueError, match="dimension of size 12 .* does not divide over mesh axes "
                                         "fsdp of size 8"):
        sharding.shardings({"w": ("embed", None)}, mesh, sharding.RULES["fsdp"],
                           {"w": jnp.zeros((12, 4))})


# ----------------------------------------------------------------------------- derived specs


def _tiny(family, scan=False):
    model, _ = models.get_model(family, "tiny", scan_layers=scan,
                                **(TINY_GPT2 if family == "gpt2" else TINY_LLAMA))
    example = jnp.zeros((1, 8), jnp.int32)
    params = lj.transform._unbox(model.init(jax.random.key(0), example)["params"])
    layouts = lj.trace_layouts(model, params, example)
    return model, example, params, layouts


def _adapters(params, layouts, method):
    return lj.init_adapters(params, lj.LoraSpec(targets=("all-linear",), method=method),
                            jax.random.key(1), layouts=layouts)


@pytest.mark.parametrize("family, scan", [("gpt2", False), ("llama", True)])
def test_adapter_specs_follow_their_kernels(family, scan):
    model, example, params, layouts = _tiny(family, scan)
    specs = sharding.param_logical_specs(model, example)
    rules = sharding.RULES["fsdp_tp"]
    adapters = _adapters(params, layouts, "dora")
    logical = sharding.logical_specs(adapters, specs)
    for path, a in lj.rules.flatten(adapters).items():
        kernel = specs[path]
        n = a.layout.n_stack
        names = lj.rules.flatten(logical)[path]
        in_names = kernel[n:n + len(a.layout.in_shape)]  # these models store kernels (in, out)
        out_names = kernel[n + len(a.layout.in_shape):]
        assert names.params["a"] == kernel[:n] + in_names + (None,), path
        assert names.params["b"] == kernel[:n] + (None,) + out_names, path
        assert names.params["m"] == names.state["base_norm"] == kernel[:n] + out_names, path
        assert sharding.to_mesh_spec(names.params["a"], rules)[-1] is None  # rank unsharded
    if scan:
        assert all(n.params["a"][0] == "layers" for n in lj.rules.flatten(logical).values())


class _EinsumNet(nn.Module):
    """A kernel stored (heads, embed, kv): inputs are not the leading axes."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("heads", "embed", "kv"))
        return nn.Einsum((2, 16, 8), "bsd,hdk->bshk", kernel_init=init, name="proj")(x)


def test_einsum_kernel_axes_are_mapped_by_letter():
    model, x = _EinsumNet(), jnp.zeros((1, 4, 16))
    params = lj.transform._unbox(model.init(jax.random.key(0), x)["params"])
    adapters = lj.init_adapters(params, lj.LoraSpec(rank=2, targets=(".*kernel",)),
                                jax.random.key(1), layouts=lj.trace_layouts(model, params, x))
    specs = sharding.param_logical_specs(model, x)
    a = sharding.logical_specs(adapters, specs)["proj"]["kernel"]
    assert a.params["a"] == ("embed", None)  # A: (d, r)
    assert a.params["b"] == (None, "heads", "kv")  # B: (r, h, k)


def test_optimizer_state_is_sharded_like_its_parameters():
    model, example, params, layouts = _tiny("llama", scan=True)
    specs = sharding.param_logical_specs(model, example)
    trainable, state = lj.split(_adapters(params, layouts, lj.methods.dora(lora_plus_ratio=16.0)))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     lj.adapter_optimizer(optax.adamw(1e-3), trainable))
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp_tp"))
    sh = sharding.train_shardings(mesh, sharding.RULES["fsdp_tp"], specs, trainable,
                                  {"params": params, "state": state}, tx)
    by_spec = {k: v for k, v in sharding.describe(sh.trainable).items()}
    matched = 0
    for path, spec in sharding.describe(sh.opt_state).items():
        tail = [p for p in by_spec if path.endswith("/" + p)]
        if tail:  # a copy of a parameter (mu, nu of 'default' and of LoRA+'s 'b' group)
            assert spec == by_spec[max(tail, key=len)], path
            matched += 1
        else:
            assert spec == str(P()), path  # counts
    assert matched == 2 * len(by_spec)  # adam's mu and nu for every trainable leaf


# ----------------------------------------------------------------------------- golden files


def _golden_table(preset):
    mesh = sharding.make_mesh(MeshConfig(preset=preset))
    rules = sharding.RULES[preset]
    table = {}
    for family, scan in (("gpt2", False), ("llama", True)):
        model, example, params, layouts = _tiny(family, scan)
        specs = sharding.param_logical_specs(model, example)
        name = f"{family}{'_scan' if scan else ''}"
        table[f"{name}/params"] = sharding.describe(
            sharding.base_shardings(specs, mesh, rules, params))
        for method in ("lora", "dora"):
            adapters = _adapters(params, layouts, method)
            table[f"{name}/{method}"] = sharding.describe(sharding.shardings(
                sharding.logical_specs(adapters, specs), mesh, rules, adapters))
    return table


@pytest.mark.parametrize("preset", PRESETS)
def test_partition_specs_match_golden_file(preset):
    path = GOLDEN / f"sharding_{preset}.json"
    table = _golden_table(preset)
    if os.environ.get("LORA_JAX_REGEN_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(path.read_text()), (
        f"PartitionSpecs changed; if intended, rerun with LORA_JAX_REGEN_GOLDEN=1 and review "
        f"the diff of {path}")


# ----------------------------------------------------------------------------- 8 devices == 1


def _experiment(method, mesh):
    name = {"lora": "lora", "dora": "dora", "full": "full_ft"}[method]
    cfg = from_dict(Experiment, importlib.import_module(f"configs.{name}").get_config().to_dict())
    return dataclasses.replace(
        cfg, mesh=mesh,
        model=dataclasses.replace(cfg.model, preset="tiny", overrides=",".join(
            f"{k}={v}" for k, v in TINY_GPT2.items()), hf_path=""),
        base=dataclasses.replace(cfg.base, source="init"),
        data=dataclasses.replace(cfg.data, n_train_per_task=16, n_eval_per_task=8, seq_len=24),
        train=dataclasses.replace(cfg.train, steps=5, batch_size=8))


def run_steps(cfg, steps=5):
    """The trainer's placement and step, without eval or checkpoints: (losses, shardings, outs)."""
    tok = trainer.D.get_tokenizer("byte")
    model, _, _ = trainer.build_model(cfg.model, tok.vocab_size)
    train, _, _ = trainer.load_data(cfg.data, tok)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = trainer.base_params(cfg, model, None, example)
    setup = trainer.make_setup(cfg, model, params, example)
    sh = trainer.shard_setup(cfg, model, example, setup)
    train_step, _ = trainer.make_steps(setup, sh)
    t, f = sharding.put((setup.trainable, setup.frozen), (sh.trainable, sh.frozen))
    o = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(t)
    loader = ArrayLoader(train, cfg.train.batch_size, seed=cfg.seed)
    losses = []
    for i in range(steps):
        batch = sharding.shard_batch(loader.batch(i), sh.mesh)
        t, o, out = train_step(t, o, f, batch, jax.random.key(i))
        losses.append(float(out["loss"]))
    assert train_step._cache_size() == 1
    return np.array(losses), sh, (t, o)


_REFERENCE = {}


def _reference(method):
    if method not in _REFERENCE:
        _REFERENCE[method] = run_steps(_experiment(method, MeshConfig(num_devices=1)))[0]
    return _REFERENCE[method]


def _check_8_devices(method, preset, **sizes):
    losses, sh, (t, o) = run_steps(_experiment(method, MeshConfig(preset=preset, **sizes)))
    np.testing.assert_allclose(losses, _reference(method), rtol=LOSS_RTOL)
    assert sh.mesh.devices.size == 8
    # The step's outputs are sharded exactly as its inputs (and as the rules say).
    same = lambda x, s: x.sharding.is_equivalent_to(s, x.ndim)
    assert all(jax.tree.leaves(jax.tree.map(same, t, sh.trainable)))
    assert all(jax.tree.leaves(jax.tree.map(same, o, sh.opt_state)))


def test_8_devices_reproduce_1_device_losses():
    _check_8_devices("lora", "fsdp_tp")


def test_two_fsdp_axes_reproduce_1_device_losses():
    _check_8_devices("lora", "fsdp", fsdp2=2)  # fsdp 4 x fsdp2 2


@pytest.mark.slow
@pytest.mark.parametrize("method, preset", [(m, p) for m in ("lora", "dora", "full")
                                            for p in PRESETS
                                            if (m, p) != ("lora", "fsdp_tp")])
def test_8_devices_reproduce_1_device_losses_every_preset(method, preset):
    _check_8_devices(method, preset)


def test_full_finetuning_shards_the_weights_themselves():
    cfg = _experiment("full", MeshConfig(preset="fsdp_tp"))
    tok = trainer.D.get_tokenizer("byte")
    model, _, _ = trainer.build_model(cfg.model, tok.vocab_size)
    example = jnp.zeros((1, 24), jnp.int32)
    params = trainer.base_params(cfg, model, None, example)
    setup = trainer.make_setup(cfg, model, params, example)
    sh = trainer.shard_setup(cfg, model, example, setup)
    assert sh.trainable["h_0"]["mlp"]["c_fc"]["kernel"].spec == P("fsdp", "tensor")
    assert sh.trainable["wte"]["embedding"].spec == P("tensor", "fsdp")
    assert sh.frozen == {}


# ----------------------------------------------------------------------------- issue 13


def test_candidate_rules_take_the_first_unused_axis_that_divides():
    rules = {"embed": "fsdp", "heads": ["tensor", "fsdp"], "kv": ["fsdp"]}
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    # q kernel: the fixed 'embed' takes fsdp first, so 'kv' finds it used.
    assert sharding.to_mesh_spec(("embed", "heads", "kv"), rules, "", (32, 4, 16), sizes) == \
        P("fsdp", "tensor", None)
    # B (r, heads, kv): heads -> tensor, kv falls back to fsdp.
    assert sharding.to_mesh_spec((None, "heads", "kv"), rules, "", (8, 4, 16), sizes) == \
        P(None, "tensor", "fsdp")
    # 3 heads: tensor does not divide, fsdp does not either; kv takes fsdp.
    assert sharding.to_mesh_spec((None, "heads", "kv"), rules, "", (8, 3, 16), sizes) == \
        P(None, None, "fsdp")
    assert sharding.logical_rules(MeshConfig(preset="fsdp", rules="mlp=tensor|fsdp"))["mlp"] == \
        ["tensor", "fsdp"]


def test_a_second_fsdp_axis_shards_factors_no_single_axis_divides():
    rules = sharding.RULES["fsdp"]
    big = {"data": 1, "fsdp": 32, "fsdp2": 8, "tensor": 1}  # 256 devices
    spec = lambda names, shape, sizes: sharding.to_mesh_spec(names, rules, "", shape, sizes)
    # Llama-7B q: the kernel splits 'embed' over both axes; B (r, 32 heads, 128) takes one each.
    assert spec(("embed", "heads", "kv"), (4096, 32, 128), big) == P(("fsdp", "fsdp2"), None, None)
    assert spec((None, "heads", "kv"), (16, 32, 128), big) == P(None, "fsdp", "fsdp2")
    # 70B k: 8 kv heads take fsdp2 (8), head-dim fsdp (32); gate/up's B takes the product.
    assert spec((None, "kv_heads", "kv"), (16, 8, 128), big) == P(None, "fsdp2", "fsdp")
    assert spec((None, "mlp"), (16, 11008), big) == P(None, ("fsdp", "fsdp2"))
    # One fsdp axis of 256: neither 32 nor 128 divides, B stays replicated (why fsdp2 exists).
    one = {"data": 1, "fsdp": 256, "fsdp2": 1, "tensor": 1}
    assert spec((None, "heads", "kv"), (16, 32, 128), one) == P(None, None, None)
    # fsdp2 of size 1 is left out of the written spec and never taken as a candidate.
    eight = {"data": 1, "fsdp": 8, "fsdp2": 1, "tensor": 1}
    assert spec(("embed", "heads", "kv"), (32, 2, 16), eight) == P("fsdp", None, None)
    assert spec((None, "heads", "kv"), (4, 2, 6), eight) == P(None, None, None)


def test_no_adapter_or_optimizer_leaf_is_replicated_under_fsdp():
    model, example, params, layouts = _tiny("llama", scan=True)
    specs = sharding.param_logical_specs(model, example)
    trainable, state = lj.split(_adapters(params, layouts, "lora"))
    tx = lj.adapter_optimizer(optax.adamw(1e-3), trainable)
    mesh = sharding.make_mesh(MeshConfig(preset="fsdp"))
    sh = sharding.train_shardings(mesh, sharding.RULES["fsdp"], specs, trainable,
                                  {"params": params, "state": state}, tx)
    sharding.check_sharded(sh.trainable, trainable, threshold_bytes=0)
    sharding.check_sharded(sh.frozen["params"], params, threshold_bytes=0)
    opt = jax.eval_shape(tx.init, trainable)
    big = sharding.replicated_leaves(sh.opt_state, opt, threshold_bytes=4)
    assert not big, big  # only the scalar step counts (4 bytes) stay replicated
    # Without the fallbacks (the old fixed rules) the check names the replicated B factors.
    old = dict(sharding.RULES["fsdp"], heads=None, kv=None, kv_heads=None, mlp=None, vocab=None)
    sh_old = sharding.train_shardings(mesh, old, specs, trainable,
                                      {"params": params, "state": state}, tx)
    with pytest.raises(ValueError, match=r"\['q_proj'\]\['kernel'\]\.params\['b'\]"):
        sharding.check_sharded(sh_old.trainable, trainable, threshold_bytes=0)
    # dp replicates by design: nothing to report.
    dp = sharding.make_mesh(MeshConfig(preset="dp"))
    sh_dp = sharding.train_shardings(dp, sharding.RULES["dp"], specs, trainable, {}, tx)
    sharding.check_sharded(sh_dp.trainable, trainable, threshold_bytes=0)


def test_put_never_aliases_the_callers_arrays():
    mesh = sharding.make_mesh(MeshConfig(preset="dp"))
    s = NamedSharding(mesh, P())
    x = jax.device_put(jnp.arange(8.0), s)
    y = sharding.put({"x": x}, {"x": s})["x"]
    step = jax.jit(lambda v: v + 1, donate_argnums=0)
    step(y)
    assert y.is_deleted() and not x.is_deleted()
    np.testing.assert_array_equal(x, np.arange(8.0))
    assert sharding.put({"x": x}, {"x": s}, may_alias=True)["x"] is x  # opt-in: no copy
    for spec in (P(), P("data")):  # a fresh array on one device, replicated or split
        x = jnp.arange(8.0)
        step(sharding.put({"x": x}, {"x": NamedSharding(mesh, spec)})["x"])
        assert not x.is_deleted(), spec


class _PlainNet(nn.Module):
    """A user's model with no logical axis names."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.Dense(64, name="hidden")(x))


def test_unnamed_parameters_warn_raise_or_take_the_largest_dimension():
    model, x = _PlainNet(), jnp.zeros((2, 16))
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp")), sharding.RULES["fsdp"]
    with pytest.warns(UserWarning, match=r"4 parameters have no logical axis names .*"
                                         r"hidden/kernel \(4,096 B\)"):
        specs = sharding.param_logical_specs(model, x, mesh=mesh, rules=rules)
    assert specs["hidden/kernel"] == ()
    with pytest.raises(ValueError, match="unnamed='largest'"):
        sharding.param_logical_specs(model, x, mesh=mesh, rules=rules, unnamed="raise")
    specs = sharding.param_logical_specs(model, x, mesh=mesh, rules=rules, unnamed="largest")
    assert specs["hidden/kernel"] == (None, "embed") and specs["hidden/bias"] == ("embed",)
    assert specs["out/kernel"] == ("embed", None) and specs["out/bias"] == ("embed",)
    params = sharding.init_sharded(model, x, mesh, rules, unnamed="largest")
    assert params["hidden"]["kernel"].sharding.spec == P(None, "fsdp")
    dp = sharding.make_mesh(MeshConfig(preset="dp"))  # dp replicates on purpose: no warning
    assert sharding.param_logical_specs(model, x, mesh=dp, rules=sharding.RULES["dp"],
                                        unnamed="raise")["out/kernel"] == ()


def test_init_sharded_is_born_in_its_shards_and_equals_one_device_init():
    model, example, params, layouts = _tiny("llama", scan=True)
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp_tp")), sharding.RULES["fsdp_tp"]
    got = sharding.init_sharded(model, example, mesh, rules, seed=0)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)  # jit vs eager
    jax.tree.map(close, got, params)
    for x in jax.tree.leaves(got):
        assert not x.sharding.is_fully_replicated, x.shape
        assert max(s.data.size for s in x.addressable_shards) < x.size
    specs = sharding.param_logical_specs(model, example)
    spec = lj.LoraSpec(targets=("all-linear",))
    adapters, sh = sharding.init_adapters_sharded(got, spec, jax.random.key(1), specs, mesh, rules,
                                                 layouts=layouts)
    want = lj.init_adapters(params, spec, jax.random.key(1), layouts=layouts)
    jax.tree.map(close, adapters, want)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, adapters, sh)))


def test_export_gathers_adapters_only_and_merges_in_shards():
    model, example, params, layouts = _tiny("llama", scan=True)
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp")), sharding.RULES["fsdp"]
    specs = sharding.param_logical_specs(model, example)
    adapters = _adapters(params, layouts, "dora")
    trainable, state = lj.split(adapters)
    tx = optax.sgd(0.1)
    sh = sharding.train_shardings(mesh, rules, specs, trainable, {"params": params,
                                                                  "state": state}, tx)
    t, f = sharding.put((trainable, {"params": params, "state": state}), (sh.trainable, sh.frozen))
    got_t, got_f = sharding.gather_for_export(t, f)
    assert got_f["params"] is f["params"]  # the base is passed through, in its shards
    merged = sharding.merge_sharded(f["params"], lj.join(t, f["state"]), sh.frozen["params"])
    want = lj.merge(params, adapters)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged,
                 want)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, merged,
                                            sh.frozen["params"])))


def test_losa_pruning_on_fsdp_tp_equals_one_device_and_masks_shard_like_kernels():
    from lora_jax.sparsity import model as sm

    model, example, params, _ = _tiny("gpt2")
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 320)
    want, want_masks = sm.prune_model(model, params, tokens, 0.5, "wanda")
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp_tp")), sharding.RULES["fsdp_tp"]
    specs = sharding.param_logical_specs(model, example)
    placed = sharding.put(params, sharding.base_shardings(specs, mesh, rules, params))
    got, masks = sm.prune_model(model, placed, tokens, 0.5, "wanda")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    for path, m in masks.items():  # the same kept entries (ties aside: none in float weights)
        np.testing.assert_array_equal(m, want_masks[path], err_msg=path)
    nested = lj.rules.unflatten(masks)  # prune_model keys masks by '/'-joined kernel path
    mask_sh = sharding.shardings(sharding.logical_specs(nested, specs), mesh, rules, nested)
    kernel_sh = lj.rules.flatten(sharding.base_shardings(specs, mesh, rules, params))
    for path, s in lj.rules.flatten(mask_sh).items():
        assert s.spec == kernel_sh[path].spec and not s.is_fully_replicated, path
    placed = sharding.put(nested, mask_sh)
    sharding.check_sharded(jax.tree.map(lambda x: x.sharding, placed), nested, threshold_bytes=0)


def test_qlora_nf4_blocks_are_sharded_under_fsdp_tp():
    model, example, params, layouts = _tiny("llama", scan=True)
    qparams = lj.quantize_params(params, "all-linear", "nf4", layouts=layouts)
    mesh, rules = sharding.make_mesh(MeshConfig(preset="fsdp_tp")), sharding.RULES["fsdp_tp"]
    specs = sharding.param_logical_specs(model, example)
    sh = sharding.shardings(sharding.logical_specs(qparams, specs), mesh, rules, qparams)
    placed = sharding.put(qparams, sh)
    flat = lj.rules.flatten(placed)
    q = flat["layers/mlp/up_proj/kernel"]
    codes = [x for x in jax.tree.leaves(q) if x.dtype == jnp.uint8 and x.size > 64]
    assert codes and all(not c.sharding.is_fully_replicated for c in codes)
    np.testing.assert_allclose(lj.dequantize_params(placed)["layers"]["mlp"]["up_proj"]["kernel"],
                               lj.dequantize_params(qparams)["layers"]["mlp"]["up_proj"]["kernel"],
                               rtol=1e-6)  # fused differently on 8 devices: 1 ulp
